# Packing without cross-contamination: packed rows compute exactly what one conversation a row computes (the loss
# and every LoRA gradient), the unmasked packing of before does not, FlexAttention's block mask (CUDA's path) equals
# the dense mask, every conversation of an epoch is packed once and whole, and a packed run resumes exactly.
import json

import pytest
import torch

import model as M
import qlora as Q
import train as T
from data.batching import IGNORE, collate, load_split, packed_batches, packing_stats, prepared_dir
from conftest import ROOT

TOK = ROOT / "data" / "sample" / "tokenizer.model"


@pytest.fixture(scope="module")
def split():
    cfg = T.parse_config(["--eval_answers=0"])
    T.get_data(cfg, TOK, torch.device("cpu"))  # prepares data/sample on first use
    return load_split(prepared_dir("sample", TOK, "assistant"), "train")


class Conversations:
    """A split of n random conversations of 4 to 16 tokens, every tenth of 40 (a split's interface, as
    packed_batches reads it): tokens in [3, vocab), a loss mask on about half of them."""
    def __init__(self, n=40, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 17, (n,), generator=g)
        lengths[::10] = 40
        self.items = [(torch.randint(3, vocab, (int(k),), generator=g), torch.rand(int(k), generator=g) < 0.5)
                      for k in lengths]
        self.lengths, self.pad_id, self.meta = lengths.numpy(), 0, dict(vocab_size=vocab)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lora_model(vocab, grad_checkpoint=False, chunked_loss=True):
    torch.manual_seed(0)
    args = M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, hidden_dim=96,
                       max_seq_len=64, norm_eps=1e-5)
    model = Q.add_lora(M.Transformer(args), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B = 0 at init would make every gradient of A zero: give B values
        for m in Q.linears_4bit(model).values():
            m.lora_B.weight.normal_(std=0.02)
    model.grad_checkpoint, model.chunked_loss = grad_checkpoint, chunked_loss
    return model.train()


def unpacked(x, y, docs, pad_id):
    """The conversations of a packed batch, one a row (the same cut), padded as collate pads them."""
    convs = [(x[r][docs[r] == d], y[r][docs[r] == d]) for r in range(len(x)) for d in docs[r].unique()
             if (y[r][docs[r] == d] != IGNORE).any() or (x[r][docs[r] == d] != pad_id).any()]
    T_ = max(len(c) for c, _ in convs)
    xu = torch.full((len(convs), T_), pad_id, dtype=torch.long)
    yu = torch.full((len(convs), T_), IGNORE, dtype=torch.long)
    for i, (cx, cy) in enumerate(convs):
        xu[i, :len(cx)], yu[i, :len(cy)] = cx, cy
    return xu, yu


def loss_and_grads(model, x, y, docs=None):
    model.zero_grad(set_to_none=True)
    loss = model(x, targets=y, docs=docs)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def close(a, b, rel=1e-6):
    return (a - b).abs().max() <= rel * b.abs().max()


@pytest.mark.parametrize("grad_checkpoint, chunked_loss", [(False, True), (True, False)])
def test_a_packed_batch_equals_one_conversation_a_row(grad_checkpoint, chunked_loss):
    convs, max_len = Conversations(), 32  # some conversations are longer: cut, they fill a row to its end
    x, y, docs = packed_batches(convs, 40, max_len, seed=0, epoch=0)[0]
    assert any(bool((row == 0).all()) for row in docs), "a row of one cut conversation"
    xu, yu = unpacked(x, y, docs, convs.pad_id)
    assert len(xu) == len(convs) > 1.5 * len(x), "every conversation, several a row"
    assert int((yu != IGNORE).sum()) == int((y != IGNORE).sum())
    model = lora_model(convs.meta["vocab_size"], grad_checkpoint, chunked_loss)
    loss, grads = loss_and_grads(model, x, y, docs)
    loss_u, grads_u = loss_and_grads(model, xu, yu)
    assert abs(loss - loss_u) <= 1e-6 * abs(loss_u), (loss, loss_u)
    assert len(grads) == 2 * 14 and all(close(grads[n], grads_u[n]) for n in grads), \
        max(((grads[n] - grads_u[n]).abs().max() / grads_u[n].abs().max()).item() for n in grads)
    # the packing of before (no document mask, positions running on across conversations) fails the same check,
    # by far: its loss by ~1e-3 relative, its gradients by tens of percent
    loss_old, grads_old = loss_and_grads(model, x, y)
    assert abs(loss_old - loss_u) > 1e-4 * abs(loss_u), (loss_old, loss_u)
    assert sum(not close(grads_old[n], grads_u[n], rel=1e-2) for n in grads) >= len(grads) // 2


@pytest.mark.parametrize("window", [None, 8])  # 8: Mistral's sliding window, inside each document too
def test_flex_attention_block_mask_equals_the_dense_mask(split, monkeypatch, window):
    # on CUDA the mask is FlexAttention's BlockMask; FlexAttention runs forward-only on CPU: eager, then compiled
    x, y, docs = packed_batches(split, 4, 64, seed=0, epoch=0)[0]
    model = lora_model(split.meta["vocab_size"]).eval()
    model.args.sliding_window = window
    dense_mask = M.document_mask
    with torch.no_grad():
        dense = model(x, docs=docs)
        if window:  # the window masks something here: these rows' documents are longer than it
            model.args.sliding_window = None
            assert (model(x, docs=docs) - dense).abs().max() > 1e-3
            model.args.sliding_window = window
        monkeypatch.setattr(M, "document_mask", lambda d, window=None: dense_mask(d, dense=False, window=window))
        assert not torch.is_tensor(M.document_mask(docs))
        flex = model(x, docs=docs)
        assert (flex - dense).abs().max() <= 1e-5 * dense.abs().max()
        if window is None:  # compiled once: the window is one more term of the same mask function
            monkeypatch.setattr(M, "flex", lambda compiled: M.torch.compile(M.flex_attention, dynamic=False))
            compiled = model(x, docs=docs)
            assert (compiled - dense).abs().max() <= 1e-5 * dense.abs().max()


def test_packed_rows_hold_every_conversation_once_and_whole(split):
    max_len = 24
    batches = packed_batches(split, 4, max_len, seed=0, epoch=0)
    assert all(x.shape == y.shape == d.shape and x.shape[1] == max_len for x, y, d in batches)
    assert all(len(x) == 4 for x, _, _ in batches[:-1]) and 1 <= len(batches[-1][0]) <= 4
    got = []
    for x, y, docs in batches:
        for r in range(len(x)):
            ids = docs[r].tolist()
            assert ids == sorted(ids) and ids[0] == 0, "a row's documents are contiguous, numbered from 0"
            for d in docs[r].unique().tolist():
                keep = docs[r] == d
                if d == ids[-1] and (x[r][keep] == split.pad_id).all() and (y[r][keep] == IGNORE).all():
                    continue  # the row's padding
                got.append((x[r][keep].tolist(), y[r][keep].tolist()))
    want = []  # each conversation as collate cuts it
    for i in range(len(split)):
        cx, cy = collate([split[i]], split.pad_id, max_len)
        want.append((cx[0].tolist(), cy[0].tolist()))
    assert sorted(got) == sorted(want)
    stats = packing_stats(split, max_len, batches)
    assert stats["conversations"] == len(split) and stats["tokens_cut"] > 0 and 0 < stats["padding"] < 0.5
    again = packed_batches(split, 4, max_len, seed=0, epoch=0)
    assert all(torch.equal(a, b) for p, q in zip(batches, again) for a, b in zip(p, q))
    assert not torch.equal(packed_batches(split, 4, max_len, seed=0, epoch=1)[0][0], batches[0][0])


def test_packed_epochs_of_different_lengths_run_on(split):
    cfg = T.parse_config(["--packing=true", "--batch_size=7", "--max_seq_len=24"])
    epochs = [T.micro_batches(cfg, split, e) for e in range(3)]
    flat = [b for e in epochs for b in e]
    batches = T.MicroBatches(cfg, split)
    for n in (0, len(epochs[0]) - 1, len(epochs[0]), len(flat) - 1, 3, 0):
        assert all(torch.equal(a, b) for a, b in zip(batches[n], flat[n])), n


def test_a_packed_run_resumes_exactly(tmp_path):
    fast = ["--packing=true", "--batch_size=4", "--max_seq_len=64", "--eval_answers=0", "--log_interval=1000",
            "--eval_interval=1000", "--lora_dropout=0.1"]
    log = lambda out: [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    T.train(T.parse_config([*fast, "--max_steps=6", f"--out_dir={tmp_path / 'ref'}"]))
    T.train(T.parse_config([*fast, "--max_steps=3", "--ckpt_interval=3", f"--out_dir={tmp_path / 'run'}"]))
    T.train(T.parse_config([*fast, "--max_steps=6", "--resume", f"--out_dir={tmp_path / 'run'}"]))
    assert log(tmp_path / "run") == log(tmp_path / "ref")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: FlexAttention's compiled kernels "
                    "(forward and backward) run on CUDA only (bench/gpu.sh)")
def test_cuda_packed_batch_through_flex_attention_equals_one_conversation_a_row():
    convs, max_len = Conversations(), 32
    x, y, docs = (t.cuda() for t in packed_batches(convs, 40, max_len, seed=0, epoch=0)[0])
    assert not torch.is_tensor(M.document_mask(docs)), "on CUDA the mask is FlexAttention's BlockMask"
    xu, yu = (t.cuda() for t in unpacked(x.cpu(), y.cpu(), docs.cpu(), convs.pad_id))
    model = lora_model(convs.meta["vocab_size"]).cuda()  # fp32: compute_dtype None is bf16 on CUDA, so set it
    for m in Q.linears_4bit(model).values():
        m.compute_dtype = torch.float32
    loss, grads = loss_and_grads(model, x, y, docs)
    loss_u, grads_u = loss_and_grads(model, xu, yu)
    assert abs(loss - loss_u) <= 1e-5 * abs(loss_u), (loss, loss_u)  # TF32-free fp32; kernels sum in other orders
    assert all(close(grads[n], grads_u[n], rel=1e-4) for n in grads)
