"""Every check a reader makes before it trusts an export, in one place: `from_pretrained` (the quantizer),
`load_compressed_state_dict` and `hf-prune info` all go through [`locate_export`] / [`check_files`], so they refuse
exactly the same checkpoints.

In order: config.json (bounded JSON, the `quantization_config` schema), the weight files (each resolved inside the
directory by `reading.contained_file`), the manifest (format version 3), then per file, from one open and one mapping:
the export id, the checksums, and every compressed group's meta and stored shapes, bounded by the dense shape the
model's config declares (so a 100-byte tensor cannot ask for gigabytes).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .codecs import MAX_META, META_SUFFIX, CorruptCheckpointError, codec_for_suffix
from .formats import split_key
from .integrity import ExportChangedError, check_manifest, read_manifest, verify_file
from .reading import DTYPES, FLOAT_DTYPES, SafetensorsFile, contained_file, read_json_object, short

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
#: Without a declared shape, a compressed weight may decode to at most this many entries per stored byte (a fully
#: pruned weight in 16x16 blocks: 2,048 per byte of block mask) plus a small constant.
ENTRIES_PER_STORED_BYTE = 4096


@dataclass
class ExportFiles:
    """What a reader found in an export directory (or beside a single safetensors file)."""

    directory: Path
    files: list[Path]
    config: dict = field(default_factory=dict)
    qc: dict | None = None  # the hf_prune quantization_config, schema-checked; None: not an hf_prune export
    version: int = 0  # hf_prune format version (0: not an hf_prune export)
    export_id: str | None = None
    manifest: dict[str, dict[str, str]] | None = None  # format version 3
    single_file: bool = False  # one file of the export was asked for: the manifest covers only that file

    @property
    def config_file(self) -> Path:
        return self.directory / "config.json"


def read_config(directory: Path) -> tuple[dict, dict | None, int]:
    """`(config, hf_prune quantization_config or None, format version)` of `directory`'s config.json (absent: `{}`)."""
    from .export_config import check_export_config

    path = directory / "config.json"
    if not path.is_file():
        return {}, None, 0
    config = read_json_object(path)
    qc = config.get("quantization_config")
    if not (isinstance(qc, dict) and qc.get("quant_method") == "hf_prune"):
        if isinstance(qc, (str, list)) or (qc is not None and not isinstance(qc, dict)):
            raise CorruptCheckpointError(f"hf_prune: {path}: quantization_config must be a JSON object, got {short(qc)}")
        return config, None, 0
    qconfig = check_export_config(qc, source=path)
    return config, qc, qconfig.format_version


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of `directory`: those the index names (each through the containment check), else
    `model.safetensors`, else every `*.safetensors`."""
    index = directory / INDEX_NAME
    if index.is_file() or index.is_symlink():
        index = contained_file(directory, INDEX_NAME, source=directory)
        data = read_json_object(index, max_depth=3)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"hf_prune: {index}: 'weight_map' must be a non-empty JSON object {{key: file}}")
        files: dict[str, Path] = {}
        for key, name in weight_map.items():
            if isinstance(name, str) and name in files:
                continue
            files[name] = contained_file(directory, name, source=index, key=key)
        return [files[name] for name in sorted(files)]
    single = directory / SINGLE_NAME
    if single.exists() or single.is_symlink():
        return [contained_file(directory, SINGLE_NAME, source=directory)]
    found = sorted(directory.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"No safetensors weights in {str(directory)!r} (hf_prune reads safetensors only)")
    return [contained_file(directory, p.name, source=directory) for p in found]


def locate_export(path: str | os.PathLike) -> ExportFiles:
    """Reads config.json, the index and the manifest of an export directory (or of the directory of one file)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config, qc, version = read_config(directory)
    export_id = qc.get("export_id") if qc and version >= 3 else None
    with changes_reported(directory, export_id):
        files = weight_files(directory) if path.is_dir() else [path]
        manifest = read_manifest(directory, export_id) if export_id else None
    return ExportFiles(directory, files, config, qc, version, export_id, manifest, single_file=not path.is_dir())


@contextlib.contextmanager
def changes_reported(directory: Path, export_id: str | None):
    """Turns an error met while reading into `ExportChangedError` when config.json now carries another export id
    than the one read at the start: a file that vanished or disagrees because another process saved over the
    export is reported as such, not as corruption."""
    try:
        yield
    except (CorruptCheckpointError, OSError) as err:
        if export_id is None or isinstance(err, ExportChangedError):
            raise
        try:
            qc = read_json_object(directory / "config.json").get("quantization_config")
            current = qc.get("export_id") if isinstance(qc, dict) else None
        except (CorruptCheckpointError, OSError):
            current = None
        if current != export_id:
            raise ExportChangedError(
                f"hf_prune: the export in {directory} changed while it was read (export id {export_id} when reading "
                f"started, {short(current)} now): another process saved over it. Load it again. ({err})"
            ) from err
        raise


def checkpoint_export(files: list[str | os.PathLike], qconfig, name_or_path: str | None) -> ExportFiles:
    """The [`ExportFiles`] of the files transformers chose for `from_pretrained` (config already parsed by it)."""
    files = [Path(f) for f in files]
    if name_or_path and Path(name_or_path).is_dir():
        directory = Path(name_or_path)
    else:  # a Hub snapshot: every file is in the snapshot directory
        directory = files[0].parent
    index = directory / INDEX_NAME
    source = index if index.is_file() else directory
    contained = [contained_file(directory, os.path.relpath(f, directory), source=source) for f in files]
    version = qconfig.format_version
    export_id = getattr(qconfig, "export_id", None) if version >= 3 else None
    manifest = read_manifest(directory, export_id) if export_id else None
    return ExportFiles(directory, contained, {}, None, version, export_id, manifest)


def open_files(files: list[Path]) -> list[SafetensorsFile]:
    """Opens every file once (closing those already open when one fails)."""
    opened: list[SafetensorsFile] = []
    try:
        for file in files:
            opened.append(SafetensorsFile(file))
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


def check_files(export: ExportFiles, opened: list[SafetensorsFile], *, verify: bool = True,
                shapes: dict[str, tuple] | None = None) -> int:
    """All per-file checks on the opened files; returns the number of tensors whose checksums were verified."""
    found: dict[str, dict[str, str]] = {}
    verified = 0
    expected_all: dict[str, str] = {}
    for f in opened:
        if not verify:
            continue
        record = verify_file(f, required=export.version >= 2, export_id=export.export_id)
        expected_all.update(record)
        found[f.path.name] = {k: record.get(k, "") for k in f.keys()}
        verified += len(f.keys()) if record else 0
    if verify and export.manifest is not None:
        manifest = export.manifest
        if export.single_file:
            manifest = {name: rec for name, rec in manifest.items() if name in found}
        check_manifest(manifest, found, export.directory)
    elif verify and expected_all:
        lost = sorted(set(expected_all) - {k for rec in found.values() for k in rec})
        if lost:
            raise CorruptCheckpointError(
                f"hf_prune: tensor(s) listed in the checksums are in none of the files: {', '.join(lost[:5])}"
                + (" ..." if len(lost) > 5 else "")
            )
    check_groups(opened, shapes)
    return verified


# --------------------------------------------------------------------------------------------- compressed groups
def _expected_shape(shapes: dict[str, tuple] | None, key: str) -> tuple | None:
    if not shapes:
        return None
    if key in shapes:
        return shapes[key]
    for other, shape in shapes.items():  # a checkpoint saved from the base model or with a head prefix
        if other.endswith("." + key) or key.endswith("." + other):
            return shape
    return None


def check_groups(opened: list[SafetensorsFile], shapes: dict[str, tuple] | None = None) -> None:
    """Every compressed group (values, one index, meta) is complete, its meta valid for its codec (reading only the
    meta, after checking it is a short int64 vector), its stored shapes and dtypes those the meta implies, and its
    dense shape the one the model declares (or, without a model, bounded by the bytes stored)."""
    where: dict[str, SafetensorsFile] = {}
    groups: dict[str, dict[str, str]] = {}
    for f in opened:
        for key in f.keys():
            base, suffix = split_key(key)
            groups.setdefault(base, {})[suffix] = key
            where[key] = f
    for base, group in groups.items():
        if set(group) == {""}:
            continue
        file = where[next(iter(group.values()))].path

        def fail(msg, file=file, base=base):
            raise CorruptCheckpointError(f"hf_prune: {file}: corrupted compressed weight {short(base)}: {msg}")

        if "" not in group:
            fail("the values tensor is missing")
        if META_SUFFIX not in group:
            fail(f"the {META_SUFFIX} tensor is missing")
        index = [s for s in group if s not in ("", META_SUFFIX)]
        if len(index) != 1:
            fail(f"expected exactly one index tensor, found {sorted(index) or 'none'}")
        codec = codec_for_suffix(index[0])
        meta_f, meta_key = where[group[META_SUFFIX]], group[META_SUFFIX]
        meta_shape = meta_f.shape(meta_key)
        if meta_f.dtype(meta_key) != "I64" or len(meta_shape) != 1 or meta_shape[0] > MAX_META:
            fail(f"{META_SUFFIX} must be a 1-D I64 tensor of at most {MAX_META} entries, got "
                 f"{meta_f.dtype(meta_key)} {short(list(meta_shape))}")
        meta = meta_f.tensor(meta_key).tolist()
        values_f, values_key = where[group[""]], group[""]
        if values_f.dtype(values_key) not in FLOAT_DTYPES:
            fail(f"the values must be floating point, got {values_f.dtype(values_key)}")
        index_f, index_key = where[group[index[0]]], group[index[0]]
        try:
            rows, cols = codec.check_stored(meta, values_f.shape(values_key), DTYPES[index_f.dtype(index_key)],
                                            index_f.shape(index_key), base)
        except CorruptCheckpointError as err:
            fail(str(err).split(": ", 2)[-1])
        expected = _expected_shape(shapes, base)
        if expected is not None and tuple(expected) != (rows, cols):
            fail(f"meta declares the dense shape [{rows}, {cols}], the model's config declares {list(expected)}")
        if expected is None:
            stored = sum(where[k].nbytes(k) for k in group.values())
            if rows * cols > ENTRIES_PER_STORED_BYTE * stored + 65536:
                fail(f"meta declares the dense shape [{rows}, {cols}] ({rows * cols} entries) from {stored} stored "
                     "bytes, more than any compressed weight decodes to")


def declared_shapes(export: ExportFiles) -> dict[str, tuple] | None:
    """The state-dict shapes the export's config declares (a meta-device model of its architecture, reshaped by the
    export format), or None where the architecture cannot be built here (remote code, unknown class): the readers
    then bound decoded sizes by the bytes stored."""
    arch = (export.config.get("architectures") or [None])[0] if isinstance(export.config.get("architectures"), list) else None
    if not export.qc or not isinstance(arch, str):
        return None
    import transformers

    cls = getattr(transformers, arch, None)
    if cls is None or not isinstance(cls, type):
        return None
    try:
        from .formats import get_export_format
        from .export_config import HfPruneExportConfig

        config = transformers.AutoConfig.from_pretrained(export.directory)
        config.quantization_config = None
        with torch.device("meta"):
            model = cls(config)
        qconfig = HfPruneExportConfig.from_dict(dict(export.qc))
        get_export_format(qconfig.format).prepare_model(model, qconfig)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as err:  # any failure only loses the exact bound; the byte bound still applies
        logger.info("hf_prune: could not build %s from %s to bound decoded sizes (%s)", arch, export.config_file, err)
        return None

