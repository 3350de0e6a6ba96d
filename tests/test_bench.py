# bench.py: a section runs alone on tiny shapes and writes its figures under the header fields, rewriting only its
# own part of the results file; a missing peer gives the skip line, never a number.
import re
from pathlib import Path

import pytest

import bench
import configurator


def test_quick_section_writes_its_figures_and_keeps_the_others(tmp_path):
    out = tmp_path / "RESULTS.md"
    bench.main(["--section=quant", "--quick", f"--out={out}"])
    bench.main(["--section=scale", "--quick", f"--out={out}"])  # another section: the first one must stay
    text = out.read_text()
    quant = re.search(r"<!-- quant -->\n(.*?)<!-- /quant -->", text, re.S).group(1)
    head = quant.splitlines()[2]
    assert re.search(r"UTC \d{4} · commit \w+", head) and "cores" in head and "GiB RAM" in head
    assert all(f"{p} " in head for p in ("torch", "triton", "transformers", "peft", "bitsandbytes"))
    # figures are measured times: check that each is there and reads as a number, never what it is (a fast machine
    # makes them small; bench.sig keeps 3 significant digits so none prints as 0.0)
    rows = re.findall(r"^\| 96 x 128 \| ours, torch \| ([^|]+) \| ([^|]+) \|", quant, re.M)
    assert rows and all(re.fullmatch(r"\d[\d,]*(\.\d+)?", v.strip()) for v in rows[0]), rows
    if "bitsandbytes" in bench.nf4_impls(bench.torch.device("cpu"), bench.peer("bitsandbytes", [])):
        assert re.search(r"^\| 96 x 128 \| bitsandbytes \| [\d.]+ \| [\d.]+ \| 1.00x \| 1.00x \|", quant, re.M)
    scale = re.search(r"<!-- scale -->\n(.*?)<!-- /scale -->", text, re.S).group(1)
    assert "needs CUDA" in scale or "peak allocated GiB" in scale
    assert text.index("<!-- quant -->") < text.index("<!-- scale -->")  # the sections keep their order


def test_missing_peer_is_skipped_not_faked(tmp_path, monkeypatch, capsys):
    real = bench.installed
    monkeypatch.setattr(bench, "installed", lambda name: None if name == "bitsandbytes" else real(name))
    out = tmp_path / "RESULTS.md"
    bench.main(["--section=quant", "--quick", f"--out={out}"])
    text = out.read_text()
    assert "skipped: bitsandbytes not installed" in capsys.readouterr().out
    assert "skipped: bitsandbytes not installed" in text
    assert "| bitsandbytes |" not in text and "| ours, torch |" in text


def test_figures_keep_three_significant_digits():
    assert [bench.sig(x) for x in (0.0000412, 0.0412, 1.234, 45.67, 1234.5, 0.0)] == \
        ["0.0000412", "0.0412", "1.23", "45.7", "1,234", "0"]


def test_scale_rows_toggle_each_saving_on_one_model_and_agree(monkeypatch):
    # the scale section's loop on CPU (tiny preset, fp32): a row per setting, each saving really switched (the 8-bit
    # optimizer built, the chunked loss called in several chunks), and the loss of the step from the same weights
    # the same in every setting: the chunked loss and offloading are exact, the 8-bit states change only later steps
    torch = bench.torch
    monkeypatch.setattr(bench.M, "CE_CHUNK_ELEMENTS", 256 * 16)  # tiny's vocab 256: 16 tokens a chunk, 8 chunks
    chunked, made = [], []  # (tokens, chunk) of each chunked-loss call; each optimizer built, by class
    apply = bench.M.ChunkedCrossEntropy.apply

    def spy(h, weight, targets, chunk, grads):
        chunked.append((h.size(0), chunk))
        return apply(h, weight, targets, chunk, grads)
    monkeypatch.setattr(bench.M.ChunkedCrossEntropy, "apply", spy)
    for name in ("PagedAdamW", "PagedAdamW8bit"):
        class Counted(getattr(bench, name)):
            def __init__(self, *a, _name=name, **k):
                made.append(_name)
                super().__init__(*a, **k)
        monkeypatch.setattr(bench, name, Counted)
    rows = bench.scale_rows("tiny", (2,), torch.device("cpu"), dtype=torch.float32, seq=64)
    assert [r["savings"] for r in rows] == [s[0] for s in bench.SAVINGS]
    assert made == ["PagedAdamW8bit" if s[1] else "PagedAdamW" for s in bench.SAVINGS]
    assert chunked == [(128, 16)] * 2 * sum(s[2] for s in bench.SAVINGS)  # 2 steps of each chunked setting
    base = rows[0]["losses"]
    for r, (_, eight_bit, _, _) in zip(rows, bench.SAVINGS):
        assert r["batch"] == "2 x 64" and r["tokens_s"] > 0 and r["managed_gib"] == 0  # CPU: nothing is paged
        assert len(r["losses"]) == 2
        assert abs(r["losses"][0] / base[0] - 1) < 1e-5, (r["savings"], r["losses"], base)
        if not eight_bit:  # the same update: the second step's loss agrees too
            assert abs(r["losses"][1] / base[1] - 1) < 1e-5, (r["savings"], r["losses"], base)


def test_fsdp_section_shards_the_base_as_train_py_does(tmp_path):
    # 2 gloo ranks under torchrun, DDP then FSDP, loaded and wrapped as train.py does (distributed.load_sharded and
    # wrap): each FSDP rank holds its part of the base (the parts add up to DDP's whole, each about half), and both
    # modes train the same losses
    out = tmp_path / "RESULTS.md"
    bench.main(["--section=fsdp", "--quick", f"--out={out}"])
    text = re.search(r"<!-- fsdp -->\n(.*?)<!-- /fsdp -->", out.read_text(), re.S).group(1)
    rows = {}
    for line in text.splitlines():  # | mode | rank of 2 | peaks x 3 | base bytes | ...
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("ddp", "fsdp"):
            rows[cells[0], int(cells[1].split()[0])] = cells[2:]
    assert sorted(rows) == [("ddp", 0), ("ddp", 1), ("fsdp", 0), ("fsdp", 1)], text
    base = {k: int(v[3].replace(",", "")) for k, v in rows.items()}
    assert base["ddp", 0] == base["ddp", 1] == base["fsdp", 0] + base["fsdp", 1]
    assert all(abs(base["fsdp", r] - base["ddp", 0] / 2) < 0.05 * base["ddp", 0] for r in (0, 1)), base
    for v in rows.values():  # the peaks are measured figures: each reads as a number
        assert all(re.fullmatch(r"\d[\d,]*", c) for c in v[:3]), v
    assert "the losses of both steps agree" in text


def test_fsdp_section_on_one_gpu_says_it_needs_two(monkeypatch):
    monkeypatch.setattr(bench.torch.cuda, "device_count", lambda: 1)
    out = []
    bench.bench_fsdp(bench.torch.device("cuda"), None, out)
    assert out == ["skipped: needs 2 GPUs (this machine has 1)"]


def test_flags_parse_into_config_and_the_child_command_lines_parse_back(monkeypatch):
    # bench.py's flags are configurator's: --key=value, --key value and a bare bool; "" leaves an optional choice
    # unset; a value outside the choices is a ConfigError. The step section's child and the fsdp section's ranks
    # run bench.py itself: their command lines parse back into the configuration each section meant.
    a = bench.parse_config(["--section", "quant", "--quick", "--threads=1", "--out", "/tmp/r.md"])
    assert (a.section, a.quick, a.threads, Path(a.out), a.impl, a.dist, a.models) == \
        ("quant", True, 1, Path("/tmp/r.md"), "", "", "")
    assert Path(bench.parse_config([]).out) == bench.ROOT / "bench" / "RESULTS.md"
    for flag, message in (("--impl=nope", "--impl must be one of ours, peer, not 'nope'"),
                          ("--batch=8x8", "--batch must be one of 4x256, 16x512, not '8x8'"),
                          ("--steps=two", "--steps takes an? int, not 'two'")):  # (regexes)
        with pytest.raises(configurator.ConfigError, match=f"^{message}$"):
            bench.parse_config([flag])

    class Started(Exception):
        pass
    cmds = []

    def run(cmd, **kw):  # the first child's command line, then stop the section
        cmds.append([str(c) for c in cmd])
        raise Started
    monkeypatch.setattr(bench.subprocess, "run", run)
    cpu = bench.torch.device("cpu")
    with pytest.raises(Started):
        bench.bench_step(cpu, a, [])
    child = bench.parse_config(cmds[0][cmds[0].index(str(bench.ROOT / "bench.py")) + 1:])
    assert (child.impl, child.quant, child.dtype, child.optimizer, child.loss, child.batch, child.steps,
            child.threads, child.quick, child.profile) == \
        ("ours", "nf4", "float32", "adamw", "full", "4x256", 2, 1, True, True) and child.ckpt
    if Path("/proc/self/clear_refs").exists():  # else the fsdp section skips before any rank starts
        with pytest.raises(Started):
            bench.bench_fsdp(cpu, a, [])
        rank = bench.parse_config(cmds[1][cmds[1].index(str(bench.ROOT / "bench.py")) + 1:])
        assert (rank.dist, rank.threads, rank.quick) == ("ddp", 1, True) and rank.ckpt == rank.dist_out != ""
