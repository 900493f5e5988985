"""Experiment tracking: Weights & Biases or nothing, behind one small interface used by both apps."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class LoggerConf:
    kind: str = "none"  # none | wandb
    project: str = "pregated-moe"
    entity: str | None = None
    mode: str = "offline"  # used when WANDB_MODE is unset
    tags: list[str] = field(default_factory=list)


class Tracker:
    """`Tracker(conf, run_config, job_type, run_dir)`; log(), table(), artifact(), finish().

    run_id: continue that W&B run (resume="allow": created if it does not exist); `run_id` is then
    the id of the run in use (None without tracking), for the caller to store for a later resume."""

    def __init__(self, conf: Any, run_config: dict[str, Any], job_type: str, run_dir: str | Path,
                 name: str | None = None, run_id: str | None = None):
        self.kind = conf.kind
        self.run = None
        self.run_id: str | None = None
        if self.kind == "none":
            return
        if self.kind != "wandb":
            raise ValueError(f"logger.kind={self.kind!r}; expected 'none' or 'wandb'")
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs the wandb package: pip install -e '.[wandb]'") from e
        self._wandb = wandb
        mode = os.environ.get("WANDB_MODE", conf.mode)
        self.run = wandb.init(
            project=conf.project, entity=conf.entity, mode=mode, config=run_config, job_type=job_type,
            dir=str(run_dir), name=name, tags=list(conf.tags), reinit="finish_previous",
            **({"id": run_id, "resume": "allow"} if run_id else {}),
        )
        self.run_id = self.run.id

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Table(columns=columns, data=rows)}, step=step)

    def image(self, key: str, path: str | Path) -> None:
        if self.run is not None:
            self.run.log({key: self._wandb.Image(str(path))})

    def artifact(self, name: str, kind: str, path: str | Path) -> None:
        if self.run is not None:
            art = self._wandb.Artifact(name, type=kind)
            p = Path(path)
            art.add_dir(str(p)) if p.is_dir() else art.add_file(str(p))
            self.run.log_artifact(art)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
