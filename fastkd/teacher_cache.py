r"""Offline teachers: :class:`TeacherCache` keeps a sparse teacher per token of a dataset on disk, so that students
train from it many times without running the teacher: its top-K log-probabilities (``kind="topk"``, optionally cut
to the top-p: ragged), or K tokens sampled from it (``kind="sampled"``, :func:`fastkd.sampled_teacher`).

Writing: ``with TeacherCache.write(path, k=64, vocab_size=V) as writer: writer.add(sample_ids, teacher, mask)``
appends each sample's tokens (those the attention mask keeps, in order) from full teacher logits (their top-``k``
log-softmax entries, or ``k`` draws) or from a :class:`fastkd.TopK` of the cache's kind. Reading:
``TeacherCache(path)[sample_id]`` is that sample's ``TopK`` of shape (L, k), and :meth:`TeacherCache.collate` pads a
batch of samples to a ``(B, L, k)`` ``TopK`` aligned with right-padded ``(B, L)`` labels.

On disk (a directory):

- ``index.json``: the format version, ``kind`` ("topk" or "sampled"), ``k``, ``vocab_size``, ``top_p``, the stored
  dtypes, the temperature the log-probabilities were taken (or the tokens drawn) at, the tail policy
  (``"implicit"``: top-K log-probabilities are the full distribution's, so the entries sum to less than 1 and the
  rest is the tail's mass; ``"none"`` for sampled teachers), and per shard its files, their sizes and SHA-256
  checksums, its tokens and samples;
- per shard, four NumPy ``.npy`` files: ``values`` (tokens, k): log-probabilities in the stored dtype (bfloat16 kept
  as its 16-bit patterns), or for a sampled teacher each entry's draw count as uint16 (read back as log(c/k) in
  float32, exactly the values :func:`fastkd.sampled_teacher` gives); ``indices`` (tokens, k) in the narrowest
  integer type that holds V (uint16 up to 65536, else int32); ``counts`` (tokens,) uint16, the entries each token
  keeps (the slots past it are stored as zeros and read back empty, index −1); and ``samples`` (samples, 3) int64
  rows of (sample id, first token, token count).

Why ``.npy`` shards: they are memory-mapped (``numpy.load(mmap_mode="r")``: no whole-file load, a sample is one
slice, O(1) from an in-memory id → (shard, offset) table), need no dependency beyond NumPy, and cost
k·(2 + 2) + 2 bytes per token at bfloat16 with V ≤ 65536 (k·(2 + 4) + 2 above): at k = 64, 258 or 386 bytes.
safetensors would add a dependency for the same layout; Arrow/Parquet would add a large one and compress what is
mostly random bits.

Crash safety: a shard's files are written under temporary names, then renamed, and only then listed in
``index.json`` (itself replaced atomically), so a partially written shard is never listed and never read.
``TeacherCache.write(path, ..., resume=True)`` reopens such a cache: the listed samples are kept, ``add`` skips the
ids already stored, and leftovers of the interrupted shard are overwritten. Opening checks every listed file's size
(a truncated file is an error naming it), and a shard's checksums are checked the first time it is read
(``verify=False`` skips that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .topk import EMPTY, TopK, sampled_teacher, topk_teacher

FORMAT_VERSION = 2
INDEX_FILE = "index.json"
KINDS = ("topk", "sampled")
PARTS = ("values", "indices", "counts", "samples")
VALUE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_TORCH_VALUE_DTYPES = {name: dtype for dtype, name in VALUE_DTYPES.items()}


def _index_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 65536 else np.int32


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: str, content: dict) -> None:
    """Replace ``path`` atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class TeacherCacheWriter:
    """Appends samples to a :class:`TeacherCache` directory (made by :meth:`TeacherCache.write`); a context manager
    whose exit writes the last shard. Not thread-safe; one writer per directory."""

    def __init__(self, path: str, index: dict, shard_tokens: int, seed: int):
        self.path, self.index, self.shard_tokens, self.seed = path, index, shard_tokens, seed
        self._generator = None  # kind "sampled": the draws' generator, made on the logits' device at first use
        self._stored = set()
        for shard in index["shards"]:
            samples = np.load(os.path.join(path, shard["files"]["samples"]))
            self._stored.update(int(i) for i in samples[:, 0])
        self._values, self._indices, self._counts, self._samples, self._tokens = [], [], [], [], 0

    def __enter__(self) -> "TeacherCacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add(
        self,
        sample_ids: Union[Sequence[int], torch.Tensor],
        teacher: Union[torch.Tensor, TopK],
        attention_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Store the tokens of a batch: ``teacher`` is full logits ``(B, L, V)`` (stored as their top-k log-softmax
        entries, cut to the cache's ``top_p``, or as ``k`` draws for a sampled cache) or a ``TopK`` ``(B, L, k)`` of
        the cache's kind (log-probabilities, or sampled at the cache's temperature; empty slots allowed);
        ``attention_mask`` ``(B, L)`` keeps the tokens where it is non-zero (all without it), in order. Samples
        whose id is already stored are skipped."""
        k, vocab_size, temperature = self.index["k"], self.index["vocab_size"], self.index["temperature"]
        sampled = self.index["kind"] == "sampled"
        if isinstance(teacher, TopK):
            if teacher.kind != ("sampled" if sampled else "logprobs"):
                raise ValueError(
                    "a TopK teacher to cache must be of the cache's kind: "
                    + ("sampled (kind='sampled')" if sampled else "log-probabilities (kind='logprobs')")
                )
            if teacher.draw_temperature != temperature:
                raise ValueError(
                    f"the TopK was taken at temperature {teacher.draw_temperature}, the cache's is {temperature}"
                )
            top = teacher
        elif isinstance(teacher, torch.Tensor) and teacher.is_floating_point():
            if teacher.shape[-1] != vocab_size:
                raise ValueError(f"teacher logits have {teacher.shape[-1]} classes, the cache vocab_size={vocab_size}")
            if sampled:
                if self._generator is None or self._generator.device != teacher.device:
                    self._generator = torch.Generator(device=teacher.device).manual_seed(self.seed)
                top = sampled_teacher(teacher.detach(), k, temperature=temperature, generator=self._generator)
            else:
                top = topk_teacher(teacher.detach().float() / temperature, k, top_p=self.index["top_p"])
        else:
            raise TypeError(f"teacher must be floating-point logits or a TopK, got {type(teacher).__name__}")
        if top.values.dim() != 3 or top.values.shape[-1] != k:
            raise ValueError(f"the teacher's entries must be (B, L, k={k}), got {tuple(top.values.shape)}")
        batch, length = top.values.shape[:2]
        ids = [int(i) for i in (sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else sample_ids)]
        if len(ids) != batch or len(set(ids)) != batch or any(i < 0 for i in ids):
            raise ValueError(f"sample_ids must be {batch} distinct ids >= 0, got {ids}")
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"attention_mask must be (B, L) = {(batch, length)}, got {tuple(attention_mask.shape)}")
        values, indices = top.values.detach().cpu(), top.indices.detach().cpu()
        present = indices >= 0
        if indices.numel() and (int(indices.min()) < EMPTY or int(indices.max()) >= vocab_size):
            raise ValueError(f"TopK indices must lie in [0, vocab_size={vocab_size}), or be -1 for an empty slot")
        counts = present.sum(-1)
        if not bool((present == (torch.arange(k) < counts.unsqueeze(-1))).all()):  # entries first, then empty
            order = torch.sort((~present).to(torch.int8), dim=-1, stable=True).indices
            values, indices, present = values.gather(-1, order), indices.gather(-1, order), present.gather(-1, order)
        if sampled:  # the draw counts, exact in uint16
            values = torch.where(present, (values.float().exp() * k).round(), 0).to(torch.int32)
        else:
            values = torch.where(present, values, 0).to(_TORCH_VALUE_DTYPES[self.index["values_dtype"]])
        indices = torch.where(present, indices, 0)
        keep = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
        for row, sample_id in enumerate(ids):
            if sample_id in self._stored:
                continue
            self._stored.add(sample_id)
            count = int(keep[row].sum())
            self._values.append(values[row][keep[row]])
            self._indices.append(indices[row][keep[row]])
            self._counts.append(counts[row][keep[row]])
            self._samples.append((sample_id, self._tokens, count))
            self._tokens += count
            if self._tokens >= self.shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self._samples:
            return
        number = len(self.index["shards"])
        values = torch.cat(self._values)
        if values.dtype == torch.bfloat16:
            stored = values.view(torch.int16).numpy().view(np.uint16)
        else:
            stored = values.numpy().astype(np.uint16) if values.dtype == torch.int32 else values.numpy()
        arrays = {
            "values": stored,
            "indices": torch.cat(self._indices).numpy().astype(_index_dtype(self.index["vocab_size"])),
            "counts": torch.cat(self._counts).numpy().astype(np.uint16),
            "samples": np.asarray(self._samples, dtype=np.int64).reshape(-1, 3),
        }
        shard = {"files": {}, "bytes": {}, "sha256": {}, "tokens": self._tokens, "samples": len(self._samples)}
        for part, array in arrays.items():
            name = f"shard-{number:05d}.{part}.npy"
            final = os.path.join(self.path, name)
            with open(final + ".tmp", "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())
            os.replace(final + ".tmp", final)
            shard["files"][part], shard["bytes"][part], shard["sha256"][part] = (
                name,
                os.path.getsize(final),
                _sha256(final),
            )
        self.index["shards"].append(shard)
        _write_json(os.path.join(self.path, INDEX_FILE), self.index)
        self._values, self._indices, self._counts, self._samples, self._tokens = [], [], [], [], 0

    def close(self) -> None:
        """Write what is buffered as the last shard."""
        self._flush()


class TeacherCache:
    """A teacher cache on disk, read-only (the module docstring has the format). ``cache[sample_id]`` is a
    ``TopK`` (L, k) of that sample's tokens; ``len(cache)`` and ``sample_id in cache`` as for a mapping."""

    def __init__(self, path: str, *, verify: bool = True):
        self.path, self.verify = str(path), verify
        self.index = _read_index(self.path)
        self._locations = {}
        for number, shard in enumerate(self.index["shards"]):
            for part in PARTS:
                file = os.path.join(self.path, shard["files"][part])
                if not os.path.isfile(file) or os.path.getsize(file) != shard["bytes"][part]:
                    raise ValueError(f"teacher cache file {file} is missing or truncated (index.json lists its size)")
            samples = np.load(os.path.join(self.path, shard["files"]["samples"]))
            for sample_id, start, count in samples.tolist():
                if sample_id in self._locations:
                    raise ValueError(f"teacher cache {self.path}: sample {sample_id} is stored twice")
                self._locations[sample_id] = (number, start, count)
        self._shards = {}  # shard number → (values, indices, counts) memory maps, opened (verified) on first use

    @staticmethod
    def write(
        path: str,
        *,
        k: int,
        vocab_size: int,
        kind: str = "topk",
        top_p: Optional[float] = None,
        dtype: torch.dtype = torch.bfloat16,
        temperature: float = 1.0,
        shard_tokens: int = 1 << 20,
        resume: bool = False,
        seed: int = 0,
    ) -> TeacherCacheWriter:
        """A writer for a new cache at ``path`` (a directory, created; an existing cache is an error unless
        ``resume``, which continues it with the same settings). ``kind``: ``"topk"`` (the top-``k``
        log-probabilities, each token cut to its top-``top_p`` prefix when given: :func:`fastkd.topk_teacher`) or
        ``"sampled"`` (``k`` tokens drawn per token: :func:`fastkd.sampled_teacher`, seeded by ``seed``; a
        resumed write draws on from the seed again, so its draws differ from an uninterrupted one); ``dtype``: of
        the stored log-probabilities (kind "topk"); ``temperature``: the logits are divided by it before the
        log-softmax (or the draws); shards hold about ``shard_tokens``."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(vocab_size, 65535):
            raise ValueError(f"k must be an int in [1, min(vocab_size, 65535)], got {k!r}")
        if top_p is not None and (kind != "topk" or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a float in (0, 1] for kind 'topk', got {top_p!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= 2**31 - 1:
            raise ValueError(f"vocab_size must be an int in [1, 2^31), got {vocab_size!r}")
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"dtype must be one of {list(VALUE_DTYPES)}, got {dtype}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
            raise ValueError(f"shard_tokens must be an int >= 1, got {shard_tokens!r}")
        path = str(path)
        settings = dict(
            format_version=FORMAT_VERSION,
            kind=kind,
            k=k,
            vocab_size=vocab_size,
            top_p=None if top_p is None else float(top_p),
            values_dtype=VALUE_DTYPES[dtype] if kind == "topk" else "uint16",
            indices_dtype=np.dtype(_index_dtype(vocab_size)).name,
            temperature=float(temperature),
            tail="implicit" if kind == "topk" else "none",
        )
        if os.path.exists(os.path.join(path, INDEX_FILE)):
            if not resume:
                raise FileExistsError(f"{path} already holds a teacher cache; pass resume=True to continue it")
            index = _read_index(path)
            differing = {key: (index[key], value) for key, value in settings.items() if index[key] != value}
            if differing:
                raise ValueError(f"the cache at {path} was written with other settings (stored, given): {differing}")
        else:
            os.makedirs(path, exist_ok=True)
            index = dict(settings, shards=[])
            _write_json(os.path.join(path, INDEX_FILE), index)
        return TeacherCacheWriter(path, index, shard_tokens, seed)

    def __len__(self) -> int:
        return len(self._locations)

    def __contains__(self, sample_id: int) -> bool:
        return sample_id in self._locations

    def sample_ids(self) -> list:
        """The stored sample ids in the order they were written."""
        return list(self._locations)

    def _shard(self, number: int):
        if number not in self._shards:
            shard = self.index["shards"][number]
            files = {part: os.path.join(self.path, shard["files"][part]) for part in PARTS[:3]}
            if self.verify:
                for part, file in files.items():
                    if _sha256(file) != shard["sha256"][part]:
                        raise ValueError(
                            f"teacher cache file {file} is corrupted (its SHA-256 differs from index.json)"
                        )
            self._shards[number] = tuple(np.load(files[part], mmap_mode="r") for part in PARTS[:3])
        return self._shards[number]

    def __getitem__(self, sample_id: int) -> TopK:
        try:
            number, start, count = self._locations[int(sample_id)]
        except KeyError:
            raise KeyError(f"sample {sample_id} is not in the teacher cache {self.path}") from None
        values, indices, counts = self._shard(number)
        stored = np.array(values[start : start + count])
        k = self.index["k"]
        if self.index["kind"] == "sampled":  # log(c/k) as sampled_teacher computes it
            value_tensor = torch.log(torch.from_numpy(stored.astype(np.float32)) / k)
        elif self.index["values_dtype"] == "bfloat16":
            value_tensor = torch.from_numpy(stored.view(np.int16)).view(torch.bfloat16)
        else:
            value_tensor = torch.from_numpy(stored)
        index_tensor = torch.from_numpy(np.array(indices[start : start + count]).astype(np.int64))
        kept = torch.arange(k) < torch.from_numpy(np.array(counts[start : start + count]).astype(np.int64))[:, None]
        return self._topk(value_tensor, torch.where(kept, index_tensor, EMPTY))

    def _topk(self, values: torch.Tensor, indices: torch.Tensor) -> TopK:
        """A TopK of the cache's kind that carries the temperature its entries were taken (or drawn) at."""
        kind = "sampled" if self.index["kind"] == "sampled" else "logprobs"
        temperature = self.index["temperature"]
        return TopK(values, indices, kind, None if kind == "logprobs" and temperature == 1.0 else temperature)

    def collate(self, sample_ids: Iterable[int], pad_to: Optional[int] = None) -> TopK:
        """The samples' entries as one ``TopK`` (B, L, k), each sample's tokens first and the rest padding (aligned
        with right-padded (B, L) labels, whose padding must be ``ignore_index``): L is ``pad_to`` or the longest
        sample. Padding tokens hold no entries (index −1, value 0)."""
        samples = [self[i] for i in sample_ids]
        longest = max((s.values.shape[0] for s in samples), default=0)
        length = longest if pad_to is None else pad_to
        if length < longest:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({longest} tokens)")
        k = self.index["k"]
        dtype = samples[0].values.dtype if samples else torch.float32
        values = torch.zeros((len(samples), length, k), dtype=dtype)
        indices = torch.full((len(samples), length, k), EMPTY, dtype=torch.int64)
        for row, sample in enumerate(samples):
            values[row, : sample.values.shape[0]] = sample.values
            indices[row, : sample.values.shape[0]] = sample.indices
        return self._topk(values, indices)

    def teacher_for(self, sample_ids, student_logits: torch.Tensor) -> TopK:
        """The cached teacher of a batch, aligned with its student logits and on their device: ``(B, L, V)`` logits
        of right-padded samples get :meth:`collate` padded to L; ``(B, V)`` logits (one row a sample) need samples
        of one token each. ``sample_ids``: (B,) ints, a tensor or a sequence."""
        ids = sample_ids.tolist() if isinstance(sample_ids, torch.Tensor) else list(sample_ids)
        rows = student_logits.shape[:-1]
        if len(ids) != rows[0] or len(rows) > 2:
            raise ValueError(
                f"sample_ids must hold one id per sample of the student logits {tuple(student_logits.shape)} "
                f"((B, V) or (B, L, V)), got {len(ids)}"
            )
        if len(rows) == 1:
            lengths = {self._locations[int(i)][2] for i in ids if int(i) in self._locations}
            if lengths - {1}:
                raise ValueError(f"(B, V) student logits take one cached token per sample, found lengths {lengths}")
        top = self.collate(ids, pad_to=1 if len(rows) == 1 else rows[1])
        if len(rows) == 1:
            top = dataclasses.replace(top, values=top.values[:, 0], indices=top.indices[:, 0])
        return top.to(student_logits.device, non_blocking=True)

    def __getstate__(self) -> dict:  # DataLoader workers: reopen the memory maps in the worker
        state = dict(self.__dict__)
        state["_shards"] = {}
        return state


def write_teacher(path: str, teacher, batches: Iterable[Mapping], *, id_key: str = "id", device=None, **options):
    """Run ``teacher`` over ``batches`` without gradient and cache its outputs at ``path``
    (:meth:`TeacherCache.write` with ``options``: ``k``, ``vocab_size``, ``kind``, ``top_p``, ...; ``vocab_size``
    defaults to the logits' last dim). Each batch is a dict: ``batch[id_key]`` the (B,) sample ids,
    ``attention_mask`` (if present) the tokens to keep; every other entry but ``labels`` goes to the model as a
    keyword argument (moved to ``device`` if given), and the logits are found in its output by
    :func:`fastkd.outputs.logits_of`. Returns the number of batches written (``fastkd cache-teacher`` runs this)."""
    from .outputs import logits_of

    writer, written = None, 0
    try:
        with torch.no_grad():
            for batch in batches:
                if not isinstance(batch, Mapping) or id_key not in batch:
                    raise ValueError(f"each batch must be a dict holding the sample ids under {id_key!r}")
                inputs = {key: value for key, value in batch.items() if key not in (id_key, "labels")}
                if device is not None:
                    inputs = {key: _to(value, device) for key, value in inputs.items()}
                logits = logits_of(teacher(**inputs), None, "teacher")
                if writer is None:
                    writer = TeacherCache.write(path, **{"vocab_size": logits.shape[-1], **options})
                writer.add(batch[id_key], logits, batch.get("attention_mask"))
                written += 1
    finally:
        if writer is not None:
            writer.close()
    return written


def _to(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _read_index(path: str) -> dict:
    file = os.path.join(path, INDEX_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"no teacher cache at {path} (no {INDEX_FILE})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"teacher cache index {file} is not valid JSON: {exc}") from None
    if index.get("format_version") != FORMAT_VERSION or index.get("kind") not in KINDS:
        raise ValueError(
            f"teacher cache {file}: format_version {index.get('format_version')!r} and kind {index.get('kind')!r}, "
            f"this fastkd reads version {FORMAT_VERSION} of kinds {KINDS}"
        )
    return index
