# bench.py: a section runs alone on tiny shapes and writes its figures under the header fields, rewriting only its
# own part of the results file; a missing peer gives the skip line, never a number.
import re
import sys

import bench


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
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    out = tmp_path / "RESULTS.md"
    bench.main(["--section=quant", "--quick", f"--out={out}"])
    text = out.read_text()
    assert "skipped: bitsandbytes not installed" in capsys.readouterr().out
    assert "skipped: bitsandbytes not installed" in text
    assert "| bitsandbytes |" not in text and "| ours, torch |" in text


def test_figures_keep_three_significant_digits():
    assert [bench.sig(x) for x in (0.0000412, 0.0412, 1.234, 45.67, 1234.5, 0.0)] == \
        ["0.0000412", "0.0412", "1.23", "45.7", "1,234", "0"]
