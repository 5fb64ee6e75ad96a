"""Restricted unpickling: load PyTorch pickles without running code from the file.

A pickle can name any importable callable and call it (``__reduce__``), so loading an
untrusted ``.pkl``/``.ckpt`` with plain ``torch.load`` is arbitrary code execution.  Here
every global the pickle asks for must be on an explicit allow-list ("Restricting Globals",
Python ``pickle`` docs); anything else raises :class:`UnsafePickleError` naming the global
and the file before it is imported.  The restricted unpickler is handed to ``torch.load``
as its ``pickle_module``, so torch still handles both file formats (zip and legacy) and
the tensor storages.

OpenAI's DALL-E ``decoder.pkl``/``encoder.pkl`` are whole pickled ``nn.Module`` objects,
which ``torch.load(weights_only=True)`` refuses unless every class is allow-listed too;
:func:`load_pickle_module` is the allow-listed equivalent with an error that names the
offending global.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
import zipfile
from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import UnsafePickleError, WeightsError

# Globals needed to rebuild tensors and plain containers: they construct data, run no file code.
TENSOR_GLOBALS = frozenset(
    {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch.device",
        "torch.Size",
        "builtins.set",
        "builtins.frozenset",
        "builtins.slice",
        "builtins.complex",
        "_codecs.encode",  # how protocol 2 stores `bytes`
        "numpy.dtype",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
    }
    | {f"torch.{name}" for name in dir(torch) if isinstance(getattr(torch, name), torch.dtype)}
)

# Module prefixes of PyTorch Lightning bookkeeping (callback classes used as dict keys,
# hparams containers) that a caller may choose to replace with inert placeholders.
LIGHTNING_BOOKKEEPING = ("pytorch_lightning.", "lightning.", "lightning_fabric.")


class _Inert:
    """Stand-in for a bookkeeping class: accepts any arguments and state, does nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def qualified_name(obj) -> str:
    """``module.qualname`` of a class or function, the form used in allow-lists."""
    return f"{obj.__module__}.{obj.__qualname__}"


def restricted_pickle_module(allowed: Iterable[str], *, source: str, inert: Iterable[str] = ()) -> types.ModuleType:
    """A stand-in for the ``pickle`` module whose unpickler admits only ``allowed`` globals.

    ``allowed`` holds ``module.name`` strings.  Globals under an ``inert`` prefix are never
    imported: they resolve to placeholder classes (for checkpoint bookkeeping we drop).
    ``source`` names the file in error messages.
    """
    allowed, inert = frozenset(allowed), tuple(inert)
    placeholders: dict[str, type] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            module, name = _py3_name(module, name)
            full = f"{module}.{name}"
            if full in allowed:
                return super().find_class(module, name)
            if inert and full.startswith(inert):
                if full not in placeholders:
                    placeholders[full] = type(name, (_Inert,), {"__module__": module})
                return placeholders[full]
            raise UnsafePickleError(
                f"{source} asks to import {full}, which is not on the allow-list of safe globals; "
                "refusing to unpickle it (it could run code): use a trusted file or a .safetensors export"
            )

    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("clipguide_restricted_pickle")
    module.Unpickler, module.load, module.UnpicklingError = RestrictedUnpickler, load, pickle.UnpicklingError
    return module


def safe_torch_load(path, allowed: Iterable[str], *, map_location="cpu", inert: Iterable[str] = (), mmap: bool = False):
    """``torch.load`` of ``path`` through :func:`restricted_pickle_module`.

    Unsafe globals raise :class:`UnsafePickleError`; an unreadable file (truncated, not a
    PyTorch file) raises a one-line :class:`WeightsError`.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist: check the path")
    _refuse_torchscript(path)
    pickle_module = restricted_pickle_module(allowed, source=str(path), inert=inert)
    try:
        return torch.load(
            path, map_location=map_location, pickle_module=pickle_module, weights_only=False,
            mmap=mmap and zipfile.is_zipfile(path),  # mmap needs the zip format; legacy files are read
        )
    except UnsafePickleError:
        raise
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... for bad files
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(
            f"{path} is not a readable PyTorch file ({type(e).__name__}: {detail}): "
            "it may be truncated or corrupt: delete it and download it again"
        ) from None


def load_pickle_module(path, allowed: Iterable[type | str], *, map_location="cpu") -> object:
    """A whole pickled object (e.g. an ``nn.Module`` saved with ``torch.save(model)``),
    admitting only the given classes plus :data:`TENSOR_GLOBALS`."""
    names = {a if isinstance(a, str) else qualified_name(a) for a in allowed}
    return safe_torch_load(path, TENSOR_GLOBALS | names, map_location=map_location)


def load_checkpoint_tensors(
    path, *, map_location="cpu", inert: Iterable[str] = (), mmap: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict checkpoint, refusing any code in the pickle.

    Accepts a plain state dict or one nested under ``"state_dict"`` (Lightning, open_clip
    training checkpoints); non-tensor entries are dropped.  Pass
    ``inert=LIGHTNING_BOOKKEEPING`` for Lightning ``.ckpt`` files, whose callback state is
    keyed by class objects: those classes become placeholders instead of being imported.
    """
    obj = safe_torch_load(path, TENSOR_GLOBALS, map_location=map_location, inert=inert, mmap=mmap)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        found = type(obj).__name__
        raise WeightsError(f"{path} holds no state dict of tensors (found {found}): pass a weights checkpoint")
    return tensors


def load_safetensors(path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (a format that holds no code); a file that is not
    one (truncated, corrupt, a pickle under that name) is a one-line :class:`WeightsError`."""
    from safetensors.torch import load_file

    try:
        return load_file(Path(path))
    except Exception as e:  # noqa: BLE001 - SafetensorError (not an OSError), OSError, ...
        detail = " ".join(str(e).split())[:200]
        raise WeightsError(f"{path} is not a readable safetensors file ({type(e).__name__}: {detail}): "
                           "it may be truncated or corrupt: restore it (clipguide train-shapes rebuilds the shipped models)") from None


def _py3_name(module: str, name: str) -> tuple[str, str]:
    """Protocol-2 pickles name Python 2 locations (``__builtin__.set``); map them the way
    ``pickle`` does so the allow-list is written in Python 3 names only."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _refuse_torchscript(path: Path) -> None:
    """TorchScript archives are executed by ``torch.jit.load``, bypassing any unpickler."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("constants.pkl") for n in z.namelist()):
                raise UnsafePickleError(
                    f"{path} is a TorchScript archive (it carries code); refusing to load it: "
                    "use a state-dict checkpoint or .safetensors file instead"
                )
