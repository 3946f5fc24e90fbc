"""What to tune and where: the user's options (``Tune``, ``RPC``) and the record of a run (``TuningLog``).

Plain data, importable without TVM: ``graphopt.Tune`` must not cost TVM's import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from graphopt.errors import TuningError


@dataclass(frozen=True)
class RPC:
    """A remote device behind a TVM RPC tracker: ``RPC("rpi4", "10.0.0.2:9190")``."""

    key: str
    tracker: str = "127.0.0.1:9190"
    session_timeout_s: int = 120

    @staticmethod
    def parse(text: str) -> "RPC":
        """``KEY@HOST:PORT`` -> RPC."""
        key, sep, tracker = text.partition("@")
        if not sep or not key or ":" not in tracker:
            raise TuningError(f"RPC device {text!r} must be written KEY@HOST:PORT, e.g. rpi4@127.0.0.1:9190")
        return RPC(key, tracker)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.tracker.rpartition(":")
        try:
            return host, int(port)
        except ValueError:
            raise TuningError(f"RPC tracker {self.tracker!r} must be HOST:PORT") from None


@dataclass
class TuningLog:
    """What the last tuning run did; filled in by every compile that uses the Tune."""

    database: str = ""
    tasks: int = 0
    tasks_done_before: int = 0  # tasks the database already covered
    records_loaded: int = 0
    baselines_measured: int = 0  # rule schedules measured as seeds
    trials_measured: int = 0  # MetaSchedule candidates measured (this run)
    tuning_s: float = 0.0
    best_ms: float | None = None  # estimated model latency from the best record of every task
    stopped_by_time_budget: bool = False
    interrupted: bool = False  # Ctrl-C: stopped after the batch in flight, records kept

    @property
    def measured(self) -> int:
        return self.baselines_measured + self.trials_measured


@dataclass(frozen=True)
class Tune:
    """How to autotune: ``trials`` measurements for the model, into database folder ``db``.

    ``time_budget`` (seconds) stops the search early; ``rpc`` measures on a remote device;
    ``seed_with_rules`` measures graphopt's rule schedule of each new task first (CPU only).
    """

    trials: int = 64
    time_budget: float | None = None
    db: str = "graphopt-tuning"
    rpc: RPC | str | None = None
    seed_with_rules: bool = True
    trials_per_iter: int = 16
    population: int = 512  # evolutionary search population (MetaSchedule's default); smaller is faster
    progress: bool = True
    seed: int = 0
    log: TuningLog = field(default_factory=TuningLog, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.trials, int) or self.trials < 0:
            raise TuningError(f"Tune(trials={self.trials!r}): trials must be an integer >= 0")
        if self.time_budget is not None and not self.time_budget > 0:
            raise TuningError(f"Tune(time_budget={self.time_budget!r}): must be a number of seconds > 0")
        if not isinstance(self.trials_per_iter, int) or self.trials_per_iter < 1:
            raise TuningError(f"Tune(trials_per_iter={self.trials_per_iter!r}): must be an integer >= 1")
        if not isinstance(self.population, int) or self.population < 2:
            raise TuningError(f"Tune(population={self.population!r}): must be an integer >= 2")
        if isinstance(self.rpc, str):
            object.__setattr__(self, "rpc", RPC.parse(self.rpc))
