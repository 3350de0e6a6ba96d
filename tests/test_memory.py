# The memory savings beside their exact references: the chunked loss against F.cross_entropy on full logits,
# offloaded block inputs against plain checkpointing, the 8-bit optimizer in a train.py run that resumes exactly,
# and the memory plan's account of each saving (--estimate: 65B under 40 GB at batch 1 x 512).
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import configurator
import model as M
import qlora as Q
import train as T
from conftest import ROOT

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (offloading is CUDA only)")


def rel_err(a, b):  # largest difference, relative to b's largest magnitude
    a, b = (a.double(), b.double()) if torch.float64 in (a.dtype, b.dtype) else (a.float(), b.float())
    return ((a - b).abs().max() / b.abs().max()).item()


def head_and_targets(n=257, vocab=1000, dim=64, dtype=torch.float32):
    torch.manual_seed(0)
    h = torch.randn(n, dim, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, dim) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,))
    t[::7] = M.IGNORE_INDEX  # some tokens out of the loss, as prompts are
    return h, w, t


@pytest.mark.parametrize("chunk", [16, 100, 257, 5000])  # 17 chunks, a partial last one, exactly one, more than n
def test_chunked_loss_equals_cross_entropy(chunk):
    # loss within 1e-6 of F.cross_entropy on the full fp32 logits; gradients within 1e-6 of the exact (fp64) ones,
    # as F.cross_entropy's own are, so within 2e-6 of F.cross_entropy's: the weight gradient sums the tokens' terms
    # chunk by chunk, in another order than one matmul over all tokens, and the two roundings may err either way
    h, w, t = head_and_targets()
    loss = M.ChunkedCrossEntropy.apply(h, w, t, chunk, True)
    ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=M.IGNORE_INDEX, reduction="sum")
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = F.cross_entropy(F.linear(h64, w64), t, ignore_index=M.IGNORE_INDEX, reduction="sum")
    grads, ref_grads = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))
    exact_grads = torch.autograd.grad(exact, (h64, w64))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    for g, r, e in zip(grads, ref_grads, exact_grads):
        assert g.dtype == r.dtype and rel_err(r.double(), e) <= 1e-6  # the reference is this accurate
        assert rel_err(g.double(), e) <= 1e-6 and rel_err(g, r) <= 2e-6


def test_chunked_loss_frozen_head_and_all_ignored():
    h, w, t = head_and_targets(n=40)
    w.requires_grad_(False)  # QLoRA's head is frozen: no weight gradient is computed
    loss = M.ChunkedCrossEntropy.apply(h, w, torch.full_like(t, M.IGNORE_INDEX), 16, True)
    loss.backward()
    assert loss.item() == 0 and torch.equal(h.grad, torch.zeros_like(h))


def test_chunked_loss_in_bf16_keeps_the_dtypes():
    # in 16 bits: close to the loss on the full bf16 logits, with bf16 gradients for bf16 inputs
    h, w, t = head_and_targets(dtype=torch.bfloat16)
    loss = M.ChunkedCrossEntropy.apply(h, w, t, 64, True)
    ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=M.IGNORE_INDEX, reduction="sum")
    (g, gw), (r, rw) = torch.autograd.grad(loss, (h, w)), torch.autograd.grad(ref, (h, w))
    assert g.dtype == gw.dtype == torch.bfloat16 and abs(loss.item() - ref.item()) <= 1e-3 * ref.item()
    assert rel_err(g, r) < 2e-2 and rel_err(gw, rw) < 2e-2


def small_qlora_model():
    torch.manual_seed(0)
    model = M.Transformer(M.ModelArgs(dim=64, n_layers=3, n_heads=4, hidden_dim=96, vocab_size=300, max_seq_len=32))
    Q.add_lora(model, r=4, alpha=8, dropout=0.0)
    for m in Q.linears_4bit(model).values():  # B = 0 at init would leave the LoRA path out of the output
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    return model


def loss_and_grads(model, idx, targets):
    loss = model(idx, targets=targets)
    params = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, params)


def batch(model, B=3, T=20):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.args.vocab_size, (B, T + 1), generator=g)
    y = idx[:, 1:].clone()
    y[:, :5] = M.IGNORE_INDEX
    return idx[:, :-1], y


def test_model_chunked_loss_equals_unchunked(monkeypatch):
    monkeypatch.setattr(M, "CE_CHUNK_ELEMENTS", 7 * 300)  # 7 tokens a chunk: 60 tokens in 9 chunks
    model = small_qlora_model()
    x, y = batch(model)
    model.chunked_loss = False
    ref, ref_grads = loss_and_grads(model, x, y)
    assert torch.equal(ref, F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum"))
    model.chunked_loss = True
    loss, grads = loss_and_grads(model, x, y)
    assert abs(loss.item() - ref.item()) <= 1e-6 * ref.item()
    with torch.no_grad():  # validation: the same loss, no gradients computed along the way
        assert torch.equal(model(x, targets=y), loss.detach())
    assert len(grads) == 2 * 7 * 3 and all(rel_err(g, r) <= 1e-6 for g, r in zip(grads, ref_grads))
    assert model(x).shape == (3, 20, 300)  # without targets: the logits, as generation needs


def test_offload_is_a_no_op_on_cpu(monkeypatch):
    # on CPU the model never builds the offloader (CUDA streams, pinned memory): results are bit-identical
    def refuse(*a, **k):
        raise AssertionError("ActivationOffload built for a CPU forward")
    monkeypatch.setattr(M, "ActivationOffload", refuse)
    model = small_qlora_model()
    model.grad_checkpoint = True
    x, y = batch(model)
    ref, ref_grads = loss_and_grads(model, x, y)
    model.offload_activations = True
    loss, grads = loss_and_grads(model, x, y)
    assert torch.equal(loss, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))


@cuda
def test_offload_on_cuda_same_results_fewer_block_inputs():
    model = small_qlora_model().cuda()
    model.grad_checkpoint = True
    x, y = (t.cuda() for t in batch(model, B=8, T=32))
    results, held = [], []
    for offload in (False, True):
        model.offload_activations = offload
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(x, targets=y)
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated() - before)  # what the graph keeps between forward and backward
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params)))
    (ref, ref_grads), (loss, grads) = results
    assert torch.allclose(loss, ref, rtol=1e-6) and all(torch.allclose(g, r, rtol=1e-5, atol=1e-7)
                                                        for g, r in zip(grads, ref_grads))
    one_input = 8 * 32 * 64 * 4
    assert held[0] - held[1] >= (len(model.model.layers) - 2) * one_input  # all but ~2 inputs left the GPU


def plan_rows(capsys, *flags):
    T.main(["--model=65b", "--estimate", "--batch_size=1", "--max_seq_len=512", *flags])
    out = capsys.readouterr().out
    return {line[:50].strip(): float(line[50:].replace(",", "").split()[0]) * 2**20 for line in out.splitlines()
            if line.endswith("MiB")}, out


def test_plan_counts_each_saving_and_65b_fits_under_40_gb(capsys):
    base, _ = plan_rows(capsys, "--chunked_loss=false")
    assert not [k for k in base if k.startswith("saved")]
    rows, out = plan_rows(capsys, "--optimizer=paged_adamw_8bit", "--offload_activations=true")
    args = M.get_args("65b")
    # each saving, from its own formula: states 8 -> 2 bytes + an fp32 absmax per 256 (every LoRA tensor of 65B
    # has >= 4096 elements); one 262-token chunk of logits instead of 512 (+ the head input's gradient, made in
    # forward); all block inputs but two in host memory
    states = base["optimizer states (2 x fp32)"]
    assert rows["saved: 8-bit optimizer states"] == pytest.approx(-states * (1 - (2 + 8 / 256) / 8), rel=1e-3)
    chunk = M.CE_CHUNK_ELEMENTS // args.vocab_size
    digit = 0.05 * 2**20  # the plan prints MiB to one decimal
    assert rows["saved: chunked loss"] == pytest.approx((chunk - 512) * args.vocab_size * 10 + 512 * args.dim * 2,
                                                        abs=digit)
    assert rows["saved: block inputs offloaded to host"] == pytest.approx(-(args.n_layers - 2) * 512 * args.dim * 2,
                                                                          abs=digit)
    saved = sum(v for k, v in rows.items() if k.startswith("saved"))
    assert rows["total"] == pytest.approx(base["total"] + saved, abs=5 * digit)  # the other lines unchanged
    assert rows["total"] < 40e9, f"65B plan {rows['total'] / 1e9:.2f} GB"
    assert "pinned host RAM" in out


def test_plan_offloads_only_checkpointed_inputs_on_cuda():
    with torch.device("meta"):
        model = M.Transformer(M.get_args("tiny"))
        Q.add_lora(model, r=8, alpha=8, dropout=0.0)
    for grad_checkpoint, cuda, offloaded in ((True, True, True), (False, True, False), (True, False, False)):
        cfg = T.parse_config(["--offload_activations=true", "--grad_checkpoint=true"])
        cfg.grad_checkpoint = grad_checkpoint  # as a config built in code may have it
        plan, _ = T.memory_plan(cfg, model, 8, 256, 4, cuda=cuda)
        assert ("saved: block inputs offloaded to host" in plan) == offloaded, (grad_checkpoint, cuda)


def test_settings():
    c = T.parse_config([])
    assert c.chunked_loss and not c.offload_activations and c.optimizer == "paged_adamw"
    assert T.parse_config(["--optimizer=paged_adamw_8bit"]).optimizer == "paged_adamw_8bit"
    with pytest.raises(configurator.ConfigError, match="paged_adamw_8bit"):
        T.parse_config(["--optimizer=adamw8bit"])
    with pytest.raises(configurator.ConfigError, match="needs --grad_checkpoint=true"):  # a no-op would be a silent one
        T.parse_config(["--offload_activations=true"])


def test_8bit_training_run_resumes_exactly(tmp_path):
    # train.py with the 8-bit optimizer and the chunked loss: 4 steps straight, and 2 + a resume from the
    # checkpoint at 2 (the one at 4 deleted) give the same losses, bit for bit
    args = [sys.executable, "train.py", "--init_from=random", "--optimizer=paged_adamw_8bit", "--max_steps=4",
            "--ckpt_interval=2", "--batch_size=8", "--eval_batches=1", "--eval_answers=0", "--log_interval=1000",
            "--eval_interval=1000", f"--out_dir={tmp_path}"]
    for extra in ([], ["--resume"]):
        p = subprocess.run(args + extra, cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
        log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
        if not extra:
            first = {r["step"]: r["loss"] for r in log}
            shutil.rmtree(tmp_path / "ckpt-000004")
    state = torch.load(tmp_path / "ckpt-000004" / "trainer_state.pt", weights_only=True)["optimizer"]["state"]
    assert {s["exp_avg"].dtype for s in state.values()} == {torch.uint8}  # every LoRA tensor of tiny is 8-bit
    assert "resuming from" in p.stdout + p.stderr
    assert {r["step"]: r["loss"] for r in log} == first and len(first) == 4
