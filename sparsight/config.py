"""Study configuration: a TOML file validated against a complete built-in default.

Resolution order, later wins: built-in defaults → profile overrides → study file →
``--set section.key=value`` overrides.  Unknown sections or keys and bad values raise
:class:`ConfigError` naming the key and the valid choices.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import closest
from .files import absolute, looks_like_path
from .layout import STUDY_FILE

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A study file or override names an unknown key or holds a bad value."""


def option(default: Any, doc: str = "", *, choices=None, each=None, lo=None, hi=None,
           hi_open: bool = False, pattern: str | None = None, path: str | None = None):
    """A config field: default, one-line doc and the constraints it is checked against.

    ``choices`` may be a callable returning them (a registry read when the value is checked).
    ``path``: ``"always"`` (a filesystem path the study reads), ``"output"`` (one it writes),
    ``"file-or-name"`` (a path when it looks like one, else a registry name such as a torchvision
    weights name) or ``"database"`` (an SQLAlchemy URL whose SQLite file is a path); such values are
    made absolute when a study is loaded, and :func:`missing_inputs` lists the read ones that are absent.
    """
    meta = dict(doc=doc, choices=choices, each=each, lo=lo, hi=hi, hi_open=hi_open, pattern=pattern, path=path)
    return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)


# Names later packages register implementations for.  Kept here so a study file can be
# validated without importing torch.
MODEL_NAMES = ("inception-small", "observer-small", "googlenet", "resnet18", "resnet50", "vgg16", "alexnet")
#: MIS embeddings: the study's observer net, raw pixels, DreamSim, or a registered model with local weights
#: (the two embedded networks excepted: they are trained per study, not loaded).
EMBEDDING_NAMES = ("observer", "pixels", "dreamsim") + tuple(m for m in MODEL_NAMES
                                                             if m not in ("inception-small", "observer-small"))
PRUNING_METHODS = ("unstructured-local", "unstructured-global", "random", "structured", "connection",
                   "lrp", "weight", "gradient", "taylor", "imp")
#: The registered method that prunes nothing: ``prune.control`` adds it at rate 0, one-shot.
CONTROL_METHOD = "control"
CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "contrast", "jpeg", "brightness", "shot_noise", "pixelate")
SCHEDULES = ("oneshot", "iterative")
STIMULUS_KINDS = ("natural", "synthetic")
DEVICE_PATTERN = r"auto|cpu|cuda|cuda:\d+|mps"


def pattern_text(pattern: str) -> str:
    """An option's pattern as a reader would write it: ``auto|cuda:\\d+`` → ``auto | cuda:N``."""
    return pattern.replace("|", " | ").replace(r"\d+", "N")


def _profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


@dataclass
class StudySection:
    name: str = option("default", "study name; outputs go to <output_dir>/<name>/", pattern=r"[A-Za-z0-9_.-]+")
    profile: str = option("default", "size profile the defaults come from: 'paper' (the published protocol), "
                                     "'default' (the demo), 'quick' (tests)", choices=_profile_names)
    seed: int = option(0, "master seed; every random choice derives from it", lo=0)
    device: str = option("auto", "auto | cpu | cuda | cuda:N", pattern=DEVICE_PATTERN)
    output_dir: str = option("runs", "parent folder of study directories (relative: to the working directory)",
                             path="output")
    progress: bool = option(True, "show progress bars")


@dataclass
class DataSection:
    source: str = option("concept-shapes", "generated concept-shapes data, or an ImageFolder tree",
                         choices=("concept-shapes", "folder"))
    path: str = option("", "for source='folder': root holding train/ and val/ class folders", path="always")
    image_size: int = option(64, "side length of the network input in pixels", lo=16, hi=1024)
    train_per_class: int = option(500, "concept-shapes: training images per class", lo=1)
    val_per_class: int = option(100, "concept-shapes: validation images per class", lo=1)
    batch_size: int = option(64, "training batch size (per process)", lo=1)
    eval_batch_size: int = option(256, "evaluation batch size", lo=1)
    num_workers: int = option(-1, "DataLoader workers; -1 picks from the CPU count", lo=-1)
    cache: str = option("auto", "decode the dataset once into memory ('auto': when it is small)",
                        choices=("auto", "memory", "none"))
    decode: str = option("auto", "image folders too large for memory: JPEGs decoded by PIL in CPU workers, or on "
                                 "the device ('auto': on a GPU)", choices=("auto", "cpu", "device"))
    on_corrupt: str = option("skip", "a file that cannot be decoded: skip with a warning, or fail",
                             choices=("skip", "error"))
    augment: str = option("auto", "training augmentation ('auto': shift-flip below 128 px, else imagenet)",
                          choices=("auto", "imagenet", "shift-flip", "none"))


@dataclass
class ModelSection:
    arch: str = option("inception-small", "network to study", choices=MODEL_NAMES)
    weights: str = option("", "local weights file, or a torchvision weights name found in the TORCH_HOME cache",
                          path="file-or-name")
    num_classes: int = option(0, "classifier outputs; 0 takes the number of classes in the data", lo=0)
    new_classifier: bool = option(False, "load model.weights but their classifier, which starts fresh with "
                                         "num_classes outputs (ImageNet weights fine-tuned on other classes)")


@dataclass
class TrainSection:
    epochs: int = option(8, "epochs of base training (0 with weights: evaluate only)", lo=0)
    optimizer: str = option("sgd", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = option(0.1, "peak learning rate", lo=0.0)
    momentum: float = option(0.9, "SGD momentum", lo=0.0, hi=1.0, hi_open=True)
    nesterov: bool = option(True, "Nesterov momentum (SGD)")
    weight_decay: float = option(5e-4, "L2 weight decay", lo=0.0)
    scheduler: str = option("onecycle", "learning-rate schedule",
                            choices=("none", "cosine", "onecycle", "exponential", "step"))
    gamma: float = option(0.9, "decay factor for exponential/step schedules", lo=0.0, hi=1.0)
    step_size: int = option(10, "epochs between decays for the step schedule", lo=1)
    warmup_epochs: float = option(0.0, "linear warm-up epochs (cosine)", lo=0.0)
    label_smoothing: float = option(0.0, "cross-entropy label smoothing", lo=0.0, hi=1.0, hi_open=True)
    grad_clip: float = option(0.0, "clip gradient norm to this value; 0 disables", lo=0.0)
    amp: str = option("auto", "mixed precision ('auto': bf16 on a GPU, off on CPU)",
                      choices=("auto", "bf16", "fp16", "off"))
    channels_last: str = option("auto", "channels_last memory format ('auto': on; measured faster on CPU and GPU)",
                                choices=("auto", "on", "off"))
    compile: bool = option(False, "wrap the model in torch.compile")


@dataclass
class ObserverSection:
    arch: str = option("observer-small", "observer network for the MIS embedding", choices=MODEL_NAMES)
    weights: str = option("", "local weights; empty trains it on the study data (embedded default)",
                          path="file-or-name")
    epochs: int = option(8, "training epochs for the observer", lo=0)
    lr: float = option(0.1, "peak learning rate for the observer", lo=0.0)


@dataclass
class PruneSection:
    methods: list = option(["unstructured-global", "structured", "connection", "lrp"],
                           "pruning methods", each=PRUNING_METHODS)
    rates: list = option([0.2, 0.4, 0.6, 0.8], "requested pruning rates", lo=0.0, hi=1.0, hi_open=True)
    schedules: list = option(["oneshot", "iterative"], "schedules", each=SCHEDULES)
    control: bool = option(True, "also retrain the base model as a one-shot pruned model is retrained, pruning "
                                 "nothing (model control-oneshot-r0.00): the rate-0 control that tells what "
                                 "retraining does to the units from what pruning does")
    iterative_steps: int = option(3, "steps of the iterative schedule", lo=1)
    copies: int = option(1, "retrained copies of every pruned model and of the control, each retrained with its "
                            "own seed (ids end in -c2, -c3, …): more models shrink the model-level noise of the "
                            "slopes, which more units cannot", lo=1)
    norm: str = option("l1", "filter norm of structured pruning", choices=("l1", "l2"))
    physical: bool = option(False, "physically remove pruned channels (Torch-Pruning)")
    exclude: list = option([], "layers never pruned; empty takes the architecture's stem")
    lrp_images_per_class: int = option(10, "reference images per class for LRP relevance", lo=1)
    imp_rewind_epoch: int = option(1, "epoch whose weights IMP rewinds to", lo=0)
    bn_recalibration_batches: int = option(0, "after each pruning step, re-estimate BatchNorm statistics on this many "
                                              "training batches before evaluating and retraining (0: off, as in the "
                                              "seed protocol); meta.json then records top-1 with stale and with "
                                              "re-estimated statistics", lo=0)
    retrain_epochs: int = option(2, "retraining epochs after one-shot pruning", lo=0)
    iterative_epochs: int = option(1, "retraining epochs after each step of the iterative schedule", lo=0)
    retrain_optimizer: str = option("sgd", "retraining optimizer", choices=("sgd", "adam", "adamw"))
    retrain_lr: float = option(0.01, "retraining learning rate", lo=0.0)
    retrain_momentum: float = option(0.9, "retraining SGD momentum", lo=0.0, hi=1.0, hi_open=True)
    retrain_weight_decay: float = option(1e-4, "retraining weight decay", lo=0.0)
    retrain_scheduler: str = option("exponential", "retraining schedule",
                                    choices=("none", "cosine", "onecycle", "exponential", "step"))
    retrain_gamma: float = option(0.9, "ExponentialLR factor while retraining", lo=0.0, hi=1.0)


@dataclass
class EvaluateSection:
    corruptions: list = option(["gaussian_noise", "gaussian_blur", "contrast", "jpeg"],
                               "corruptions for robustness accuracy", each=CORRUPTIONS)
    severities: list = option([1, 2, 3, 4, 5], "corruption severities", each=(1, 2, 3, 4, 5))
    noise_levels: int = option(15, "noise-similarity levels in linspace(0, noise_eps_max)", lo=2)
    noise_eps_max: float = option(0.7, "largest noise-similarity epsilon", lo=0.0)
    prune_potential_delta: float = option(0.005, "error margin of prune potential", lo=0.0, hi=1.0)
    prune_potential_bootstrap: int = option(1000, "bootstrap resamples of the images for the prune potential's "
                                            "95 % interval (paired across models); 0 = none", lo=0)
    max_images: int = option(500, "robustness on at most this many validation images; 0 = all", lo=0)


@dataclass
class UnitsSection:
    layers: list = option([], "layers whose units are studied; empty takes the architecture's default")
    units: list = option([], "explicit units instead of a sample, e.g. ['inception4a:3', 'inception4b:0-7']")
    units_per_layer: int = option(8, "units sampled per layer (seeded)", lo=1)
    sampling: str = option("per-layer", "per-layer sample, or IMI-style (layer uniformly, then channel)",
                           choices=("per-layer", "imi", "all"))
    skip_dead: bool = option(True, "skip units whose activation is constant")


@dataclass
class StimuliSection:
    kinds: list = option(["natural", "synthetic"], "stimulus kinds", each=STIMULUS_KINDS)
    split: str = option("train", "data split the natural exemplars are mined from (the papers: ImageNet's "
                                 "training set)", choices=("val", "train"))
    models: list = option([], "models that get stimuli (model ids); empty = every model of the study")
    synthetic_units: int = option(0, "feature visualizations for a seeded sample of this many units, spread evenly "
                                     "over the layers and drawn among the study's units that are alive in every "
                                     "model (each is then compared with itself at every rate); natural exemplars "
                                     "stay for every unit; 0: visualizations for every unit", lo=0)
    n_tasks: int = option(20, "tasks per unit (N)", lo=1)
    n_references: int = option(9, "references per side (K)", lo=1)
    query_percentile: float = option(0.0, "0 takes queries from the least extreme ranks of the top set; "
                                          "else the activation percentile (e.g. 99, 95, 85)", lo=0.0, hi=100.0)
    mining_precision: str = option("fp32", "activation mining arithmetic: fp32, or bf16 autocast (faster on a GPU; "
                                           "near-ties may swap)", choices=("fp32", "bf16"))
    fv_steps: int = option(512, "feature-visualization optimization steps", lo=1)
    fv_lr: float = option(0.05, "feature-visualization Adam learning rate", lo=0.0)
    fv_image_size: int = option(0, "feature-visualization size; 0 = model input size", lo=0)
    fv_batch_units: int = option(64, "units optimized at once", lo=1)
    fv_diversity: float = option(10.0, "weight of the Gram-similarity diversity term of the diverse images "
                                       "(absolute; lucid used 1e2 for GoogLeNet)", lo=0.0)
    fv_objective: str = option("pre-relu", "what a visualization maximizes (minimizes): the unit before its final "
                                           "ReLU (gradients never die at the start; minima mean something), or "
                                           "the layer output", choices=("pre-relu", "post-relu"))
    fv_redirect_steps: int = option(16, "first steps in which every ReLU passes Lucid's redirected gradient", lo=0)
    fv_patience: int = option(0, "an image stops once its objective has not improved by fv_tolerance for this "
                                 "many steps (fv_steps is then the cap); 0: always fv_steps, as published", lo=0)
    fv_tolerance: float = option(0.01, "relative improvement that counts for fv_patience", lo=0.0)
    fv_rescue_steps: int = option(0, "max visualizations whose unit is still silent (zero activation) after "
                                     "fv_steps go on for up to this many more steps, each until its unit fires; "
                                     "0: never, as published", lo=0)


@dataclass
class MisSection:
    embedding: str = option("observer", "similarity embedding: 'observer' (the study's observer net), a registered "
                                        "model name with local weights, 'dreamsim', or 'pixels'",
                            choices=EMBEDDING_NAMES)
    embedding_weights: str = option("", "weights of a model-name embedding (file or torchvision name in the "
                                        "TORCH_HOME cache); for 'dreamsim' its local checkpoint folder",
                                    path="file-or-name")
    embedding_size: int = option(0, "embedding input size in pixels; 0 = the backbone's own", lo=0)
    alpha: float = option(16.0, "slope turning similarity differences into P(correct) until fitted on humans",
                          lo=0.0)
    alpha_source: str = option("auto", "'auto': fit α on the study's human responses once there are "
                                       "min_human_responses of them, else use mis.alpha; 'configured': "
                                       "always mis.alpha",
                               choices=("auto", "configured"))
    min_human_responses: int = option(200, "human main-trial responses needed before α is fitted", lo=2)
    bootstrap: int = option(1000, "bootstrap resamples over units", lo=0)
    batch_size: int = option(128, "images embedded per batch", lo=1)


@dataclass
class DissectionSection:
    quantile: float = option(0.995, "activation threshold quantile (0.995: a unit's top 0.5 % of activations over "
                                    "the probe set)", lo=0.0, hi=1.0, hi_open=True)
    iou_threshold: float = option(0.04, "a unit is interpretable above this IoU", lo=0.0, hi=1.0)
    units: str = option("all", "'all': every channel of the unit layers (units.layers, else the architecture's), as "
                               "Frankle & Bau; 'study': the study's sampled units", choices=("all", "study"))
    probe: str = option("", "probe folder: a Broden release (index.csv, images/) or concepts.json, images/, masks/; "
                            "empty = the study data's concept masks", path="always")
    split: str = option("val", "split of the study data used as the probe set (when probe is empty)",
                        choices=("val", "train"))
    max_images: int = option(0, "dissect on a seeded sample of at most this many probe images; 0 = all", lo=0)


@dataclass
class SurveySection:
    database: str = option("", "SQLAlchemy URL (e.g. postgresql+psycopg://user:pw@host/db); empty = "
                               "sqlite <run_dir>/survey.db", path="database")
    condition_by: str = option("model-kind", "what one participant's trials share: one model and one reference "
                                             "kind (IMI), one kind, one model, or nothing",
                               choices=("model-kind", "kind", "model", "none"))
    models: list = option([], "models whose stimuli are served; empty = every model in the stimulus bank")
    kinds: list = option(["natural", "synthetic"], "reference kinds served", each=STIMULUS_KINDS)
    units: str = option("every-kind", "units served: those with stimuli of every served kind (the kinds are then "
                                      "compared on the same units, as in IMI), or every unit of the bank",
                        choices=("every-kind", "all"))
    reserved_tasks: int = option(1, "tasks of every unit kept out of the main trials and used for practice and catch "
                                    "trials, so neither reveals a main trial's answer", lo=1)
    practice_trials: int = option(5, "practice trials", lo=0)
    practice_attempts: int = option(3, "practice repetitions allowed", lo=1)
    main_trials: int = option(40, "main trials per participant", lo=1)
    catch_trials: int = option(5, "catch trials per participant (a query that also appears among the references)",
                               lo=0)
    min_response_ms: int = option(1500, "responses accepted after this many ms", lo=0)
    check_server_time: bool = option(True, "refuse a human answer that reaches the server sooner than "
                                           "min_response_ms after its trial was first served, or that claims a "
                                           "longer rt_ms than the server saw (plus 1 s): a client's timing is "
                                           "never trusted alone")
    feedback_delay_ms: int = option(350, "ms between the chosen image's frame and the correct one's", lo=0)
    feedback_ms: int = option(1150, "ms the correct/incorrect frame stays on screen", lo=0)
    reference_px: int = option(128, "displayed size of a reference image (CSS px; the stimuli are scaled)", lo=16)
    query_px: int = option(176, "displayed size of a query image (CSS px)", lo=16)
    min_window_width: int = option(1000, "smallest browser window (CSS px) a participant may use", lo=0)
    min_window_height: int = option(600, "smallest browser window height (CSS px)", lo=0)
    slot_timeout_min: int = option(60, "an unfinished session stops counting towards unit balance after this many "
                                       "idle minutes", lo=1)
    completion_code: str = option("", "Prolific completion code; empty = a thank-you page without redirect")
    completion_url: str = option("https://app.prolific.com/submissions/complete?cc={code}",
                                 "where a finished participant is sent ({code} = completion_code)")
    screenout_code: str = option("", "Prolific code for participants who fail practice; empty = no redirect")
    catch_min_accuracy: float = option(0.8, "exclusion: least catch-trial accuracy", lo=0.0, hi=1.0)
    min_answers_per_position: int = option(5, "exclusion: least answers on each query position (upper, lower)",
                                           lo=0)
    max_same_button_share: float = option(0.9, "exclusion: largest share of main trials answered with one and the "
                                               "same button (row and confidence)", lo=0.0, hi=1.0)
    min_instruction_s: float = option(15.0, "exclusion: least seconds on the instructions", lo=0.0)
    min_total_s: float = option(135.0, "exclusion: least seconds for the whole session", lo=0.0)
    max_total_s: float = option(2500.0, "exclusion: most seconds for the whole session", lo=0.0)
    machine_participants: int = option(1, "machine participants run by the study", lo=0)
    require_external_id: str = option("auto", "'yes': only a study link carrying PROLIFIC_PID starts a session, so "
                                              "nobody takes part twice by opening the bare address; 'auto': yes "
                                              "when completion_code is set", choices=("auto", "yes", "no"))
    researcher: str = option("", "consent page: who runs the study")
    institution: str = option("", "consent page: the institution responsible for the study")
    contact: str = option("", "consent page: how to reach the researchers (e.g. an e-mail address)")
    ethics_reference: str = option("", "consent page: the ethics approval (committee and reference number)")
    payment: str = option("", "consent page: what participants are paid, e.g. '£2.40 through Prolific'")
    withdrawal: str = option("You can stop at any time by closing the window, without giving a reason.",
                             "consent page: how participants withdraw")
    data_retention: str = option("Your anonymised answers are kept for research and may be published as open data; "
                                 "your participant ID is removed before publication.",
                                 "consent page: what is kept, for how long and who sees it")
    seconds_per_trial: float = option(7.0, "consent page: seconds one trial takes, for the duration it states "
                                           "(instructions count one minute)", lo=0.5)
    decline_code: str = option("", "Prolific code for participants who decline consent (e.g. NOCONSENT); empty: a "
                                   "page without redirect")
    templates: str = option("", "folder of Jinja templates that replace built-in pages of the same name "
                                "(consent.html, instructions.html, …)", path="always")
    secure_cookies: bool = option(False, "mark cookies Secure (HTTPS only): turn on when the survey is served over "
                                         "HTTPS, e.g. behind a TLS proxy")
    proxy_hops: int = option(0, "reverse proxies in front of the server whose X-Forwarded-For/-Proto headers are "
                                "trusted (client address for login throttling, https for Secure cookies); 0: none",
                             lo=0)


@dataclass
class AnalysisSection:
    tost_margin: float = option(0.05, "equivalence margin on the accuracy/MIS scale", lo=0.0)
    bootstrap: int = option(10000, "bootstrap resamples for per-unit CIs", lo=0)
    alpha_level: float = option(0.05, "significance level", lo=0.0, hi=1.0, hi_open=True)
    power_participant_sd: float = option(0.5, "power simulation: SD of participants' ability on the logit scale, "
                                              "assumed until the study has enough human participants to estimate "
                                              "it", lo=0.0)
    power_simulations: int = option(400, "power simulation: simulated studies per design in the report", lo=10)


@dataclass
class StudyConfig:
    study: StudySection = field(default_factory=StudySection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    observer: ObserverSection = field(default_factory=ObserverSection)
    prune: PruneSection = field(default_factory=PruneSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    units: UnitsSection = field(default_factory=UnitsSection)
    stimuli: StimuliSection = field(default_factory=StimuliSection)
    mis: MisSection = field(default_factory=MisSection)
    dissection: DissectionSection = field(default_factory=DissectionSection)
    survey: SurveySection = field(default_factory=SurveySection)
    analysis: AnalysisSection = field(default_factory=AnalysisSection)
    location = None     # the study directory when the study was opened from one (not a setting)

    # ---- views -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    @property
    def run_dir(self) -> Path:
        """The study directory: the one it was opened from, else ``<output_dir>/<name>``."""
        return Path(self.location) if self.location else Path(self.study.output_dir) / self.study.name

    def section(self, name: str):
        return getattr(self, name)


# ---- profiles ---------------------------------------------------------------------------
def _overlay(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied section by section (a new dict)."""
    return {sec: {**base.get(sec, {}), **changes.get(sec, {})} for sec in {**base, **changes}}


# The demo: the whole design (4 methods × 4 rates × one-shot and iterative) on the embedded
# default, sized to finish in under 10 minutes on 2 CPU cores (measured in benchmarks/RESULTS.md).
_DEMO = {
    "data": {"train_per_class": 200, "val_per_class": 30, "batch_size": 32},
    "train": {"epochs": 8, "lr": 0.05},
    "observer": {"epochs": 5, "lr": 0.1},
    "prune": {"rates": [0.25, 0.5, 0.75], "iterative_steps": 2, "retrain_epochs": 1, "iterative_epochs": 1,
              "lrp_images_per_class": 4},
    "evaluate": {"severities": [2, 4], "noise_levels": 5, "max_images": 0},  # all 300 validation images
    # natural exemplars (cheap) for every unit of the five unit layers (744); feature visualizations for
    # 30 units alive in every model, the same in each (precision and power: benchmarks/RESULTS.md)
    "units": {"sampling": "all"},
    # feature visualizations: measured to reach their units' natural max references (benchmarks/RESULTS.md);
    # the rescue lets the few max images still silent after 48 steps go on until their unit fires
    # exemplars from the held-out split, whose 300 images cover the tasks' 2 × 8 × 4 per unit
    "stimuli": {"split": "val", "synthetic_units": 30, "n_tasks": 8, "n_references": 3, "fv_steps": 48,
                "fv_lr": 0.15, "fv_diversity": 1.0, "fv_batch_units": 16, "fv_rescue_steps": 144},
    "mis": {"bootstrap": 500},
    "survey": {"practice_trials": 2, "main_trials": 12, "catch_trials": 2, "min_answers_per_position": 2,
               "min_total_s": 10.0},
    "analysis": {"bootstrap": 1000},
}

PROFILES: dict[str, dict] = {
    # The protocol numbers of the papers (DESIGN §4, §6, §7): the built-in defaults unchanged, under a study
    # name of its own (not the demo's folder).
    "paper": {"study": {"name": "paper"}},
    "default": _DEMO,
    # The test suite: the demo's data, every pruning method at three rates, one-shot, fewer tasks.
    "quick": _overlay(_DEMO, {
        "study": {"name": "quick"},
        "train": {"epochs": 7},
        "prune": {"methods": list(PRUNING_METHODS), "rates": [0.3, 0.6, 0.9], "schedules": ["oneshot"],
                  "lrp_images_per_class": 2},
        "evaluate": {"severities": [1, 3, 5]},
        "units": {"sampling": "per-layer", "units_per_layer": 2},
        "stimuli": {"synthetic_units": 0, "n_tasks": 4, "fv_steps": 16},
        "mis": {"bootstrap": 200},
        "survey": {"main_trials": 6, "catch_trials": 1, "min_answers_per_position": 1},
        "analysis": {"bootstrap": 500},
    }),
}


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(StudyConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(StudyConfig)}


def _check_value(where: str, value: Any, kind: type, meta: dict) -> Any:
    """Coerce and check one value; raise ConfigError naming ``where``."""
    def fail(msg: str):
        raise ConfigError(f"{where}: {msg}")

    if kind is bool:
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"expected an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"expected a number, got {value!r}")
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            fail(f"expected a string, got {value!r}")
    elif kind is list:
        if not isinstance(value, list):
            fail(f"expected a list, got {value!r}")
        if meta.get("each"):
            bad = [v for v in value if v not in meta["each"]]
            if bad:
                fail(f"{bad[0]!r} is not valid; choose from {list(meta['each'])}")
        if len(set(map(repr, value))) != len(value):
            fail(f"duplicate entries in {value!r}")
        for v in value:
            _check_range(where, v, meta, fail)
        return list(value)
    choices = meta.get("choices")
    choices = choices() if callable(choices) else choices
    if choices is not None and value not in choices:
        fail(f"{value!r} is not valid; choose from {list(choices)}")
    if meta.get("pattern") and not re.fullmatch(meta["pattern"], value):
        fail(f"{value!r} is not valid; expected {pattern_text(meta['pattern'])}")
    _check_range(where, value, meta, fail)
    return value


def _check_range(where, value, meta, fail):
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        if meta.get("lo") is not None or meta.get("hi") is not None:
            if not isinstance(value, (int, float)):
                fail(f"expected a number, got {value!r}")
        return
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and value < lo:
        fail(f"{value!r} is below the minimum {lo}")
    if hi is not None and (value >= hi if meta.get("hi_open") else value > hi):
        bound = f"below {hi}" if meta.get("hi_open") else f"at most {hi}"
        fail(f"{value!r} is out of range; it must be {bound}")


def _apply(cfg: StudyConfig, tree: dict, origin: str) -> None:
    sections = _sections()
    for sec_name, values in tree.items():
        if sec_name not in sections:
            hint = closest(sec_name, sections)
            raise ConfigError(f"{origin}: unknown section [{sec_name}]{hint + ' ' if hint else '; '}valid sections: "
                              f"{sorted(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{sec_name}] must be a table of keys")
        sec_cls = sections[sec_name]
        section = getattr(cfg, sec_name)
        fields = {f.name: f for f in dataclasses.fields(sec_cls)}
        hints = typing.get_type_hints(sec_cls)
        for key, value in values.items():
            if key not in fields:
                hint = closest(key, fields)
                raise ConfigError(f"{origin}: unknown key {sec_name}.{key}{hint + ' ' if hint else '; '}valid keys "
                                  f"in [{sec_name}]: {sorted(fields)}")
            checked = _check_value(f"{origin}: {sec_name}.{key}", value, hints[key], fields[key].metadata)
            setattr(section, key, checked)


def apply_settings(cfg: StudyConfig, tree: dict, origin: str = "settings") -> StudyConfig:
    """Apply ``{section: {key: value}}`` to ``cfg`` with the same checks as a study file."""
    _apply(cfg, tree, origin)
    absolutize_paths(cfg)
    validate_study(cfg)
    return cfg


def settings_tree(dotted: dict[str, Any]) -> dict:
    """``{"train.epochs": 3, "train.lr": None}`` → ``{"train": {"epochs": 3}}``: values given as data
    (``None`` means not given), in the shape :func:`load_study` applies."""
    tree: dict = {}
    for key, value in dotted.items():
        if value is not None:
            section, _, name = key.partition(".")
            tree.setdefault(section, {})[name] = value
    return tree


def parse_override(text: str) -> dict:
    """``"train.epochs=3"`` → ``{"train": {"epochs": 3}}``; the value is parsed as TOML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word is a string
    return {section: {key: value}}


def read_toml(path: str | Path, what: str, error: type[Exception] = ConfigError) -> dict:
    """The TOML file ``path``; a missing or invalid file raises ``error`` naming it as ``what``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise error(f"{what} {path} is not valid TOML: {err}") from None


def _profile_in(trees: list[dict]):
    """The first ``study.profile`` the trees set (``--set study.profile=X`` chooses a profile as ``--profile X``
    does, so the values are the profile's, not only its name)."""
    for tree in trees:
        section = tree.get("study")
        if isinstance(section, dict) and section.get("profile"):
            return section["profile"]
    return None


def load_study(path: str | Path | None = None, profile: str | None = None,
               overrides: typing.Iterable[str] = (), settings: dict | None = None) -> StudyConfig:
    """Resolve a study: defaults, profile, study file, ``section.key=value`` overrides, then ``settings``
    (``{section: {key: value}}``, e.g. from command-line flags)."""
    file_tree = read_toml(path, "study file") if path is not None else {}
    trees = [(text, parse_override(text)) for text in overrides]
    chosen = profile or _profile_in([tree for _, tree in trees][::-1] + [file_tree]) or "default"
    if not isinstance(chosen, str) or chosen not in PROFILES:
        raise ConfigError(f"unknown profile {chosen!r}; choose from {sorted(PROFILES)}")
    cfg = StudyConfig()
    _apply(cfg, PROFILES[chosen], f"profile {chosen}")
    cfg.study.profile = chosen
    _apply(cfg, file_tree, str(path) if path else "study")
    for text, tree in trees:
        _apply(cfg, tree, f"override {text!r}")
    _apply(cfg, settings or {}, "command-line options")
    if profile:
        cfg.study.profile = profile
    absolutize_paths(cfg)
    validate_study(cfg)
    return cfg


def study_from_run_dir(run_dir: str | Path, overrides: typing.Iterable[str] = (),
                       settings: dict | None = None) -> StudyConfig:
    """The study of an existing study directory: its ``study.toml`` (the built-in default when it has
    none) with ``overrides``, located at ``run_dir`` itself, so a moved or copied folder keeps working
    (its study name, which its survey responses are filed under, stays the recorded one)."""
    run_dir = absolute(run_dir)
    toml = run_dir / STUDY_FILE
    cfg = load_study(toml if toml.is_file() else None, overrides=overrides, settings=settings)
    cfg.location = run_dir
    return cfg


_RELATIVE_SQLITE = re.compile(r"^(sqlite(?:\+\w+)?:///)(?!/)(.+)$")


def absolutize_paths(cfg: StudyConfig) -> StudyConfig:
    """Make every path-valued setting absolute, relative ones taken against the working directory.

    Paths in a study file, in ``--set`` and on the command line are all relative to the directory the
    command runs in (not to the study file), so one study file works the same from any option; the
    resolved ``study.toml`` written into the study directory records the absolute paths.
    """
    for sec_name in _sections():
        section = getattr(cfg, sec_name)
        for f in dataclasses.fields(section):
            kind, value = f.metadata.get("path"), getattr(section, f.name)
            if not kind or not value:
                continue
            if kind in ("always", "output") or (kind == "file-or-name" and looks_like_path(value)):
                setattr(section, f.name, str(absolute(value)))
            elif kind == "database":
                setattr(section, f.name, absolute_database_url(value))
    return cfg


def missing_inputs(cfg: StudyConfig) -> list[str]:
    """``"section.key: PATH does not exist"`` for every file or folder the study names to read that is
    not there (a torchvision weights name is not a path: its cache is checked where it loads)."""
    missing = []
    for sec_name in _sections():
        section = getattr(cfg, sec_name)
        for f in dataclasses.fields(section):
            kind, value = f.metadata.get("path"), getattr(section, f.name)
            if not value or kind not in ("always", "file-or-name"):
                continue
            if (kind == "always" or looks_like_path(value)) and not Path(value).expanduser().exists():
                missing.append(f"{sec_name}.{f.name}: {value} does not exist")
    return missing


def absolute_database_url(url: str) -> str:
    """An SQLAlchemy URL whose relative SQLite file is made absolute (other URLs unchanged)."""
    m = _RELATIVE_SQLITE.match(url or "")
    if not m or m.group(2).startswith(":memory:"):
        return url
    path, _, query = m.group(2).partition("?")
    return m.group(1) + str(absolute(path)) + (f"?{query}" if query else "")


def validate_study(cfg: StudyConfig) -> None:
    """Checks that span several keys."""
    if cfg.data.source == "folder" and not cfg.data.path:
        raise ConfigError("data.path: required when data.source = 'folder' (a folder with train/ and val/)")
    if not cfg.prune.rates:
        raise ConfigError("prune.rates: give at least one rate in [0, 1)")
    if cfg.survey.min_total_s > cfg.survey.max_total_s:
        raise ConfigError(f"survey.min_total_s ({cfg.survey.min_total_s:g}) must not exceed survey.max_total_s "
                          f"({cfg.survey.max_total_s:g})")
    if "{code}" not in cfg.survey.completion_url:
        raise ConfigError("survey.completion_url: must contain {code}, where the completion code goes")


def write_study(cfg: StudyConfig, run_dir: str | Path) -> Path:
    """Write the study's configuration (profile, study file and overrides applied; every key) to
    ``run_dir/study.toml``."""
    from .files import atomic_write_text
    return atomic_write_text(Path(run_dir) / STUDY_FILE,
                             "# sparsight study configuration: the profile with the study file and every --set applied,\n"
                             "# every setting listed.  \"auto\" values and empty lists (default layers, exclusions) are\n"
                             "# decided where they are used and recorded there: models/*/meta.json, stimuli/units.csv,\n"
                             "# mis/units.csv, .stages/*.json.\n" + cfg.to_toml())


def describe_options(cfg: StudyConfig | None = None) -> str:
    """Every section and key with its value and doc: the reference behind ``--help``.  With ``cfg`` (a resolved
    study: profile, study file and ``--set``) the values are its own, and each one its profile or study sets
    otherwise names the built-in default beside it."""
    lines = []
    for sec_name, sec_cls in _sections().items():
        lines.append(f"[{sec_name}]")
        default = sec_cls()
        for f in dataclasses.fields(sec_cls):
            choices = f.metadata.get("choices")
            choices = choices() if callable(choices) else choices
            hint = f" (one of {', '.join(map(str, choices))})" if choices else ""
            base = getattr(default, f.name)
            value = getattr(getattr(cfg, sec_name), f.name) if cfg is not None else base
            same = value == base or (f.metadata.get("path") in ("always", "output") and base
                                     and value == str(absolute(base)))       # a path made absolute on loading
            changed = "" if same else f" [built-in default: {_toml_value(base)}]"
            lines.append(f"  {f.name} = {_toml_value(value)}    # {f.metadata['doc']}{hint}{changed}")
    return "\n".join(lines)


# ---- a small TOML writer (the config holds only scalars and flat lists) -------------------
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(tree: dict) -> str:
    out = []
    for sec_name, values in tree.items():
        out.append(f"\n[{sec_name}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(out).lstrip() + "\n"
