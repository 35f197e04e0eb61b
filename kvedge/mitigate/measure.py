"""Export and verify measure configurations by auditing them: this builds the audit spec from typed
configs and runs the audit pipeline (the same lock, session, store, statistics and reports as `kvedge
audit`), returning the typed report. Nothing here goes back through the public API."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..audit import pipeline
from ..audit.spec import AuditSpec, auto_batch
from ..datasets import select_prompts
from ..detectors import default_detector
from ..gguf.kvmap import KVConfig
from ..gguf.lora import check_adapter
from ..gguf.model import inspect_model
from ..llama.runtime import RuntimeOptions
from ..results.audit import AuditReport


def audit_configs(model: Path, adapter: Path | None, configs: Sequence[KVConfig], rotation: bool, split: str,
                  limit: int | None, max_tokens: int, options: RuntimeOptions, noise: str | None, out: Path,
                  progress: bool) -> AuditReport:
    """`configs` (the f16 reference is always run, and the noise run unless `noise` is None) at one
    rotation, on `split` (at most `limit` prompts a group), stored and reported in `out`."""
    info = inspect_model(model)
    lora = check_adapter(adapter, info) if adapter else None
    spec = AuditSpec(
        model=info, prompts=tuple(select_prompts(split=split, limit=limit)),
        kv=tuple(dict.fromkeys(c.resolve(info) for c in configs)), rotation="on" if rotation else "off",
        lora_path=lora, max_tokens=max_tokens, options=options, out_dir=Path(out), noise=noise,
        batch=auto_batch(info), detector=default_detector())
    return pipeline.run(spec, progress=progress).report
