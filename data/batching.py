"""
Batches for training from a split written by data/<name>/prepare.py (see data/oasst1/prepare.py for the format).

  ds = load_split("data/sample", "train")                            # memory-mapped, ds[i] -> (tokens, mask)
  for idx in length_grouped_batches(ds, batch_size=16, seed=0, epoch=0):
      x, y = collate([ds[i] for i in idx], ds.pad_id, max_len=512)    # (B, T) inputs, (B, T) targets, -100 = no loss
  for x, y in packed_batches(ds, batch_size=16, block_size=512, seed=0, epoch=0): ...
  folder = prepare_dir("sample", "data/sample/tokenizer.model")      # data/sample/prepared/<key>/, made if missing

Group-by-length is the QLoRA paper's (and Hugging Face's `group_by_length`): batches of similar length waste little
on padding, and the longest batch goes first so an out-of-memory shows at step 1, not hours in.
"""
import importlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from data.oasst1.prepare import DataError, file_sha256
from tokenizer import tokenizer_sha256

DATA = Path(__file__).resolve().parent  # data/: a folder per dataset, each with its prepare.py
IGNORE = -100  # target value that cross_entropy(ignore_index=-100) skips
TRAIN, ASSISTANT = 1, 2  # bits of the .mask.bin flags (as in data/oasst1/prepare.py)


def _map(path, dtype):
    """The file as a read-only array; a missing file or a size that is no whole number of entries is a DataError."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); prepare the data again") from None
    if size % dtype.itemsize:
        raise DataError(f"{path}: {size} bytes, not a whole number of {dtype.name} entries: a corrupt or cut file")
    # np.memmap refuses empty files (an empty val split of a tiny input)
    return np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype)


def load_meta(dir):
    """meta.json of a prepared folder, checked for what batching needs: dtype, vocab size and the special ids."""
    file = Path(dir) / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror}); run data/<name>/prepare.py") from None
    except (ValueError, RecursionError) as e:  # bad JSON or bad UTF-8
        raise DataError(f"{file}: not valid JSON ({str(e)[:200]}); prepare the data again") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in ("uint16", "uint32"):
        raise DataError(f"{file}: no token dtype (uint16 or uint32): not a prepared folder's meta.json")
    if type(vocab := meta.get("vocab_size")) is not int or vocab <= 0:
        raise DataError(f"{file}: vocab_size is {vocab!r}, not a positive int")
    for k in ("bos_id", "eos_id", "pad_id"):  # bos_id -1: a tokenizer with none (Qwen's)
        if type(meta.get(k)) is not int or not -(k == "bos_id") <= meta[k] < vocab:
            raise DataError(f"{file}: {k} is {meta.get(k)!r}, not a token id below vocab_size {vocab}")
    return meta


def prepared_dir(name, tokenizer_path, train_on="assistant", root=DATA):
    """root/<name>/prepared/<tokenizer hash>-<loss mode>-<prepare.py hash>/: the one place the key is made. Each
    tokenizer, loss mode and version of the preparing script (its split, say) gets its own folder, so preparing
    another never changes the files a running job has mapped, and a changed script never reads stale files."""
    script = Path(root) / name / "prepare.py"
    try:
        key = f"{tokenizer_sha256(tokenizer_path)[:12]}-{train_on}-{file_sha256(script)[:8]}"
    except OSError as e:
        raise DataError(f"{e.filename}: cannot read ({e.strerror})") from None
    return script.parent / "prepared" / key


def remove_stale(folder):
    """Remove the <key>.tmp<pid> folders in `folder` of processes that no longer exist: a run killed while
    preparing leaves one behind. A live process's folder (another job preparing now) is never touched."""
    for p in Path(folder).glob("*.tmp*"):
        m = re.fullmatch(r".+\.tmp(\d+)", p.name)
        if not m or not p.is_dir() or int(m[1]) == os.getpid():  # our own is the caller's to clear
            continue
        try:
            os.kill(int(m[1]), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (OSError, OverflowError):  # PermissionError: alive, another user's; a number no pid can be: keep
            pass


def prepare_dir(name, tokenizer_path, train_on="assistant", verbose=True):
    """prepared_dir(name, ...), made first by data/<name>/prepare.py if it holds no meta.json yet: written whole
    under <key>.tmp<pid> and renamed, so no reader ever sees half a folder. One process per folder should call it
    (train.py: rank 0, the others wait at a barrier). Leftovers of killed runs are removed first."""
    folder = prepared_dir(name, tokenizer_path, train_on)
    if (folder / "meta.json").exists():
        return folder
    if folder.parent.is_dir():
        remove_stale(folder.parent)
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        importlib.import_module(f"data.{name}.prepare").prepare(
            tokenizer_path=tokenizer_path, out_dir=tmp, train_on=train_on, verbose=verbose)
    except BaseException:  # a failed or interrupted run leaves no half folder (a kill -9 does: remove_stale)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, folder)
    except OSError:  # another job prepared the same folder first: its files are the same
        shutil.rmtree(tmp)
    return folder


def datasets():
    """The names --data takes: the folders of data/ with a prepare.py."""
    return sorted(p.parent.name for p in DATA.glob("*/prepare.py"))


def data_folder(data, tokenizer_path, train_on="assistant", prepare=True):
    """The prepared folder for --data: a dataset's name (data/<name>/prepared/<key>, made first with prepare=True:
    one process prepares, train.py's others wait and call this with prepare=False), or the path of a folder that a
    data/*/prepare.py already wrote for this tokenizer and loss mode."""
    if (name := data.rstrip("/")) in datasets():
        return prepare_dir(name, tokenizer_path, train_on) if prepare else prepared_dir(name, tokenizer_path, train_on)
    if not (data and (Path(data) / "meta.json").exists()):
        raise DataError(f"--data={data!r}: not a dataset ({', '.join(datasets())}: a folder of data/ with a "
                        "prepare.py) nor a prepared folder with a meta.json")
    meta = load_meta(data)
    want = dict(tokenizer_sha256=tokenizer_sha256(tokenizer_path), train_on=train_on)
    if bad := [k for k, v in want.items() if meta.get(k) != v]:
        raise DataError(f"{Path(data) / 'meta.json'}: prepared with another {' and '.join(bad)} than this run's; "
                        "prepare it again")
    return Path(data)


class Split:
    """One prepared split: conversation i is (tokens int64 (L,), mask bool (L,)), mask = in the loss. The files are
    checked against each other as they open, so a corrupt folder is a DataError naming the file, not a numpy error
    or a token id out of range in the middle of training."""
    def __init__(self, dir, split):
        dir = Path(dir)
        self.meta = load_meta(dir)
        self.tokens = _map(dir / f"{split}.bin", np.dtype(self.meta["dtype"]))
        self.flags = _map(dir / f"{split}.mask.bin", np.dtype(np.uint8))
        idx = dir / f"{split}.idx.bin"
        self.offsets = np.array(_map(idx, np.dtype(np.int64)))  # a copy in memory: N+1 small numbers
        if len(self.offsets) == 0 or self.offsets[0] != 0 or (np.diff(self.offsets) < 0).any():
            raise DataError(f"{idx}: offsets must start at 0 and never decrease (N+1 entries for N conversations)")
        if not len(self.tokens) == len(self.flags) == self.offsets[-1]:
            raise DataError(f"{idx}: ends at token {self.offsets[-1]}, but {split}.bin holds {len(self.tokens)} tokens "
                            f"and {split}.mask.bin {len(self.flags)} flags: the files disagree")
        if len(self.tokens) and (top := int(self.tokens.max())) >= self.meta["vocab_size"]:
            raise DataError(f"{dir / f'{split}.bin'}: token id {top} is out of range (vocab_size "
                            f"{self.meta['vocab_size']} in meta.json)")
        self.lengths = np.diff(self.offsets)  # tokens per conversation, for grouping by length
        self.bos_id, self.eos_id, self.pad_id = self.meta["bos_id"], self.meta["eos_id"], self.meta["pad_id"]

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = self.offsets[i], self.offsets[i + 1]
        tokens = torch.from_numpy(self.tokens[a:b].astype(np.int64))
        mask = torch.from_numpy((self.flags[a:b] & TRAIN) > 0)
        return tokens, mask

    def prompt_answer(self, i):
        """(prompt ids: BOS .. '### Assistant:', answer ids without EOS) of the first exchange, for exact-match eval."""
        a, b = self.offsets[i], self.offsets[i + 1]
        tokens, role = self.tokens[a:b].astype(np.int64), (self.flags[a:b] & ASSISTANT) > 0
        start = int(role.argmax())  # first assistant token; the reply runs until its EOS
        end = start + int(np.argmax(tokens[start:] == self.eos_id))
        return tokens[:start].tolist(), tokens[start:end].tolist()


def load_split(dir, split):
    return Split(dir, split)


def length_grouped_batches(dataset, batch_size, seed, epoch, mega_batches=50):
    """Lists of indices: shuffle, sort by length within chunks of `mega_batches` batches, shuffle batch order,
    longest batch first. Every index appears once; one batch (the end of the last chunk) may be short."""
    rng = np.random.default_rng([seed, epoch])  # a new order every epoch, the same for the same (seed, epoch)
    perm, chunk, batches = rng.permutation(len(dataset)), batch_size * mega_batches, []
    for s in range(0, len(perm), chunk):
        mega = perm[s:s + chunk]
        mega = mega[np.argsort(-dataset.lengths[mega], kind="stable")]  # longest first within the chunk
        batches += [mega[i:i + batch_size].tolist() for i in range(0, len(mega), batch_size)]
    batches = [batches[j] for j in rng.permutation(len(batches))]
    if not batches:
        return []
    longest = int(np.argmax([dataset.lengths[b].max() for b in batches]))  # first batch holding the longest
    batches.insert(0, batches.pop(longest))
    return batches


def collate(examples, pad_id, max_len):
    """(input_ids, targets), both (B, T) int64 with T = min(max_len, longest - 1): input = tokens[:-1],
    target = tokens[1:] where the target token is in the loss, else IGNORE; padding is pad_id / IGNORE."""
    T = min(max_len, max(len(t) for t, _ in examples) - 1)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, (tokens, mask) in enumerate(examples):
        n = min(len(tokens) - 1, T)  # truncation keeps the beginning (the prompt), may cut the reply
        x[b, :n] = tokens[:n]
        y[b, :n] = torch.where(mask[1:n + 1], tokens[1:n + 1], IGNORE)  # the mask of the *target* position
    return x, y


OPEN_ROWS = 64  # packing: rows still taking conversations (a window over the shuffled order)


def packed_batches(dataset, batch_size, max_len, seed, epoch):
    """List of (input_ids, targets, docs), each (B, max_len) int64: whole conversations packed into rows
    in a shuffled order, fixed by (seed, epoch). Each conversation is cut as collate cuts it (its first
    min(len - 1, max_len) inputs) and goes whole into the fullest of the last OPEN_ROWS rows that has room
    for it, or starts a new row (online best fit; what no conversation fills is padding, pad_id / IGNORE).
    Rows come in the order they were started, so the order stays shuffled. docs numbers the conversations of a
    row 0, 1, ... and its padding one more: the model gives each its own positions and attention, so a
    packed batch computes what one conversation per row would. Nothing is dropped: the last batch may be
    short, and every epoch holds every conversation (rows per epoch vary with the order)."""
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
    n = np.minimum(dataset.lengths[order] - 1, max_len)  # inputs per conversation, as collate takes them
    rows, room, first_open = [], [], 0  # rows (lists of conversations), their room; rows[first_open:] open
    for i, k in zip(order.tolist(), n.tolist()):
        if k < 1:  # a single token predicts nothing (collate gives it an all-IGNORE row)
            continue
        fits = [r for r in range(first_open, len(rows)) if room[r] >= k]
        if fits:  # best fit among the open rows: the fullest one that takes it
            r = min(fits, key=lambda r: room[r])
        else:
            r = len(rows)
            rows.append([])
            room.append(max_len)
            first_open = max(first_open, len(rows) - OPEN_ROWS)  # the oldest row is closed
        rows[r].append(i)
        room[r] -= k
    x = torch.full((len(rows), max_len), dataset.pad_id, dtype=torch.long)
    y = torch.full((len(rows), max_len), IGNORE, dtype=torch.long)
    docs = torch.zeros((len(rows), max_len), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, i in enumerate(row):
            tokens, mask = dataset[i]
            k = min(len(tokens) - 1, max_len)
            x[r, start:start + k] = tokens[:k]
            y[r, start:start + k] = torch.where(mask[1:k + 1], tokens[1:k + 1], IGNORE)
            docs[r, start:start + k] = d
            start += k
        docs[r, start:] = len(row)  # the padding: a document of its own, in no loss
    return [(x[b:b + batch_size], y[b:b + batch_size], docs[b:b + batch_size])
            for b in range(0, len(rows), batch_size)]


def packing_stats(dataset, max_len, batches):
    """What packed rows hold: conversations, the tokens cut beyond max_len (as unpacked training cuts
    them: packing itself drops none), and the padding fraction of the rows."""
    inputs = np.maximum(dataset.lengths - 1, 0)
    real, total = int(np.minimum(inputs, max_len).sum()), sum(x.numel() for x, _, _ in batches)
    return dict(conversations=len(dataset), tokens_cut=int(np.maximum(inputs - max_len, 0).sum()),
                padding=1 - real / max(total, 1))
