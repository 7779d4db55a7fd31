"""``python -m sparsight`` (also what ``torchrun -m sparsight`` launches)."""
from .cli import main

if __name__ == "__main__":
    main()
