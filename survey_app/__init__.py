"""Survey app: forced-choice trials for people (Flask) and the machine-participant API."""
