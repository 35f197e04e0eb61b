"""The deployment: what deploy.json pins (schema `kvedge.deploy/1`, docs/deploy-schema.md), the same
configuration in each runtime's own syntax, and parsers that read each rendering back, so tests and
`kvedge verify` can check that every file says what deploy.json says.

Renderings, written beside deploy.json:
- `llama-server.sh`, `llama-cli.sh`: POSIX shell launchers (paths relative to the script's folder where
  the file is in the deployment, absolute otherwise; extra arguments are passed on);
- `llama-cpp-python.json`: keyword arguments for `llama_cpp.Llama` and the environment to set before
  the context is created (`llama_kwargs` resolves its paths);
- `Modelfile` and `ollama.env` where Ollama can express the configuration: Ollama has one cache type for
  K and V (`OLLAMA_KV_CACHE_TYPE`: f16, q8_0 or q4_0), set for the whole server, and needs
  `OLLAMA_FLASH_ATTENTION=1` for a quantized cache.

The attention rotation has no command-line flag in llama.cpp: `LLAMA_ATTN_ROT_DISABLE=1` in the
environment turns it off on builds that have it; builds before it never rotate.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..gguf import kvtypes
from ..llama.runtime import ROTATION_ENV
from ..results.deploy import Deployment, FileRef, Launch
from .preconditions import OLLAMA, Precondition, for_runtime, ollama_refusal, quantized, rotation_requirement

LLAMA_SCRIPTS = {"llama-server.sh": "llama-server", "llama-cli.sh": "llama-cli"}
PYTHON_FILE = "llama-cpp-python.json"
MODELFILE, OLLAMA_ENV = "Modelfile", "ollama.env"
HERE = "$here"  # the launch scripts' own folder


@dataclass(frozen=True)
class Parsed:
    """What a rendering says, read back."""

    model: Path
    adapter: Path | None
    type_k: str
    type_v: str
    n_ctx: int
    flash_attn: bool
    rotation: bool


def expected(dep: Deployment, root: Path) -> Parsed:
    L = dep.launch
    return Parsed(dep.model.resolve(root), dep.adapter.resolve(root) if dep.adapter else None, L.type_k, L.type_v,
                  L.n_ctx, L.flash_attn, L.rotation)


def ollama_support(launch: Launch) -> tuple[bool, str]:
    why = ollama_refusal(launch)
    if why:
        return False, why
    note = ("rotation: whether Ollama's engine rotates depends on the llama.cpp it bundles; kvedge verified "
            f"rotation {'on' if launch.rotation else 'off'}: audit on the device to be sure")
    return True, note


# --- rendering ---------------------------------------------------------------------------------------
def _script_path(ref: FileRef) -> str:
    return f'"{HERE}/{ref.path}"' if ref.inside else shlex.quote(ref.path)


def _llama_args(dep: Deployment) -> list[str]:
    L = dep.launch
    args = ["-m", _script_path(dep.model)]
    if dep.adapter:
        args += ["--lora", _script_path(dep.adapter)]
    return args + ["-c", str(L.n_ctx), "-fa", "on" if L.flash_attn else "off", "-ctk", L.type_k, "-ctv", L.type_v]


def render_script(dep: Deployment, binary: str, title: str, pre: Sequence[Precondition] = ()) -> str:
    env = dep.launch.env[ROTATION_ENV]
    lines = [
        "#!/bin/sh",
        f"# {title}",
        f"# Written by kvedge {__version__} from deploy.json; check it with `kvedge verify <this folder>`.",
        f"# {rotation_requirement(dep.launch.rotation, quantized(dep.launch))}",
        *(f"# {p.comment()}" for p in for_runtime(list(pre), binary)),
        "# Extra arguments are passed on to the runtime.",
        'here=$(cd "$(dirname "$0")" && pwd)',
        f"export {ROTATION_ENV}={env}" if env else f"unset {ROTATION_ENV}",
        "exec " + " ".join([binary, *_llama_args(dep), '"$@"']),
        "",
    ]
    return "\n".join(lines)


def render_llama_cpp_python(dep: Deployment, pre: Sequence[Precondition] = ()) -> str:
    L = dep.launch
    kwargs = {"model_path": dep.model.path, "lora_path": dep.adapter.path if dep.adapter else None, "n_ctx": L.n_ctx,
              "flash_attn": L.flash_attn, "type_k": int(kvtypes.ggml_type(L.type_k)),
              "type_v": int(kvtypes.ggml_type(L.type_v))}
    doc = {
        "kwargs": kwargs,
        "env": L.env,
        "paths": "relative paths are relative to this file's folder",
        "usage": "kw, env = kvedge.mitigate.deploy.llama_kwargs(FOLDER); set env (None: unset) before creating "
                 "llama_cpp.Llama(**kw); type_k and type_v are ggml type ids (llama_cpp.GGML_TYPE_*)",
        "types": {"type_k": L.type_k, "type_v": L.type_v},
        "llama_cpp_python": "0.3.36",
        "preconditions": [p.to_dict() for p in for_runtime(list(pre), "llama-cpp-python")],
    }
    return json.dumps(doc, indent=2) + "\n"


def render_ollama(dep: Deployment, title: str, pre: Sequence[Precondition] = ()) -> tuple[str, str]:
    L = dep.launch
    why = ollama_refusal(L)
    if why:
        raise RenderingError(f"no Ollama rendering: {why}")
    required = [f"# {p.comment()}" for p in for_runtime(list(pre), OLLAMA)]

    def ref(r: FileRef) -> str:
        return f"./{r.path}" if r.inside else r.path

    modelfile = [f"# {title}", f"# Written by kvedge {__version__}; set the server settings in {OLLAMA_ENV} first.",
                 *required, f"FROM {ref(dep.model)}"]
    if dep.adapter:
        modelfile.append(f"ADAPTER {ref(dep.adapter)}")
    modelfile += [f"PARAMETER num_ctx {L.n_ctx}", ""]
    env = ["# Ollama server settings for this deployment: set them where `ollama serve` runs, then restart it.",
           *required,
           f"OLLAMA_FLASH_ATTENTION={1 if L.flash_attn else 0}", f"OLLAMA_KV_CACHE_TYPE={L.type_k}"]
    if not L.rotation:
        env += ["# turns llama.cpp's attention rotation off where the bundled build has it", f"{ROTATION_ENV}=1"]
    return "\n".join(modelfile), "\n".join(env) + "\n"


def render_all(dep: Deployment, title: str, pre: Sequence[Precondition] = ()) -> dict[str, str]:
    """File name -> text of every rendering this deployment can have, each stating the preconditions
    (kvedge.mitigate.preconditions) of its runtime."""
    out = {name: render_script(dep, binary, title, pre) for name, binary in LLAMA_SCRIPTS.items()}
    out[PYTHON_FILE] = render_llama_cpp_python(dep, pre)
    if ollama_refusal(dep.launch) is None:
        out[MODELFILE], out[OLLAMA_ENV] = render_ollama(dep, title, pre)
    return out


# --- reading back ------------------------------------------------------------------------------------
class RenderingError(ValueError):
    pass


def _flag_value(args: list[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        if a in names:
            if i + 1 >= len(args):
                raise RenderingError(f"{a} has no value")
            return args[i + 1]
    return None


def _script_file(word: str, root: Path) -> Path:
    return Path(root) / word[len(HERE) + 1:] if word.startswith(HERE + "/") else Path(word)


def parse_script(text: str, root: Path) -> Parsed:
    env: dict[str, str | None] = {}
    command: list[str] | None = None
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "export" and "=" in words[1]:
            k, v = words[1].split("=", 1)
            env[k] = v
        elif words[0] == "unset":
            env[words[1]] = None
        elif words[0] == "exec":
            command = words[1:]
    if command is None:
        raise RenderingError("no exec line")
    model, lora = _flag_value(command, "-m", "--model"), _flag_value(command, "--lora")
    if model is None:
        raise RenderingError("no -m")
    return Parsed(_script_file(model, root), _script_file(lora, root) if lora else None,
                  kvtypes.check(_flag_value(command, "-ctk", "--cache-type-k") or "f16"),
                  kvtypes.check(_flag_value(command, "-ctv", "--cache-type-v") or "f16"),
                  int(_flag_value(command, "-c", "--ctx-size") or 0),
                  (_flag_value(command, "-fa", "--flash-attn") or "auto") == "on",
                  env.get(ROTATION_ENV) in (None, "0"))


_GGML_NAMES = {int(kvtypes.ggml_type(n)): n for n in kvtypes.NAMES}


def parse_llama_cpp_python(text: str, root: Path) -> Parsed:
    d = json.loads(text)
    kw, env = d["kwargs"], d.get("env", {})
    lora = kw.get("lora_path")
    return Parsed(FileRef(kw["model_path"], "", 0).resolve(root), FileRef(lora, "", 0).resolve(root) if lora else None,
                  _GGML_NAMES[int(kw["type_k"])], _GGML_NAMES[int(kw["type_v"])], int(kw["n_ctx"]),
                  bool(kw["flash_attn"]), env.get(ROTATION_ENV) in (None, "0"))


def parse_ollama(modelfile: str, env_text: str, root: Path) -> Parsed:
    found: dict[str, str] = {}
    for line in modelfile.splitlines():
        words = line.split(None, 2)
        if not words or words[0].startswith("#"):
            continue
        key = words[0].upper()
        if key in ("FROM", "ADAPTER"):
            found[key] = line.split(None, 1)[1].strip()
        elif key == "PARAMETER" and len(words) == 3:
            found[words[1]] = words[2].strip()
    env: dict[str, str] = {}
    for line in env_text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k.strip()] = v.strip()

    def path(p: str | None) -> Path | None:
        return None if p is None else Path(root) / p[2:] if p.startswith("./") else Path(p)

    t = kvtypes.check(env.get("OLLAMA_KV_CACHE_TYPE", "f16"))
    return Parsed(path(found["FROM"]), path(found.get("ADAPTER")), t, t, int(found.get("num_ctx", 0)),
                  env.get("OLLAMA_FLASH_ATTENTION") in ("1", "true"), env.get(ROTATION_ENV) in (None, "0"))


def read_renderings(root: Path) -> dict[str, Parsed]:
    """Every rendering present in a deployment folder, read back."""
    root = Path(root)
    out = {}
    for name in LLAMA_SCRIPTS:
        if (root / name).is_file():
            out[name] = parse_script((root / name).read_text(encoding="utf-8"), root)
    if (root / PYTHON_FILE).is_file():
        out[PYTHON_FILE] = parse_llama_cpp_python((root / PYTHON_FILE).read_text(encoding="utf-8"), root)
    if (root / MODELFILE).is_file():
        env = (root / OLLAMA_ENV).read_text(encoding="utf-8") if (root / OLLAMA_ENV).is_file() else ""
        out[MODELFILE] = parse_ollama((root / MODELFILE).read_text(encoding="utf-8"), env, root)
    return out


def disagreements(dep: Deployment, root: Path) -> list[str]:
    """The renderings that do not say what deploy.json says (empty when all agree)."""
    want = expected(dep, root)
    out = []
    try:
        got = read_renderings(root)
    except (RenderingError, ValueError, KeyError, IndexError) as exc:
        return [f"a rendering cannot be read: {exc}"]
    for name, parsed in got.items():
        if parsed != want:
            diff = [f for f in want.__dataclass_fields__ if getattr(parsed, f) != getattr(want, f)]
            out.append(f"{name} differs from deploy.json in {', '.join(diff)}")
    return out


def llama_kwargs(folder: str | Path) -> tuple[dict, dict[str, str | None]]:
    """The llama-cpp-python keyword arguments of a deployment folder, paths resolved, and the environment
    to set before `llama_cpp.Llama(**kwargs)` creates its context."""
    folder = Path(folder)
    d = json.loads((folder / PYTHON_FILE).read_text(encoding="utf-8"))
    kw = dict(d["kwargs"])
    kw["model_path"] = str(FileRef(kw["model_path"], "", 0).resolve(folder))
    if kw.get("lora_path"):
        kw["lora_path"] = str(FileRef(kw["lora_path"], "", 0).resolve(folder))
    return kw, dict(d.get("env", {}))
