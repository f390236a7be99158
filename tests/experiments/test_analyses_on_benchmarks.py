"""``deepalign analyze`` on a benchmark file instead of the synthetic world."""

from __future__ import annotations

import csv

from deepalign.cli import main


def test_analyses_run_on_a_benchmark_file(world, tmp_path, capsys):
    assert main(["world", "--output", str(tmp_path / "w")]) == 0
    model = str(tmp_path / "w" / "model")
    path = tmp_path / "advbench.csv"
    with path.open("w", newline="") as handle:  # AdvBench layout, the world's words (its tokenizer is word-level)
        writer = csv.writer(handle)
        writer.writerow(["goal", "target"])
        for item in world.harmful_items()[:3]:
            writer.writerow([world.request(item), world.compliant_response(item)])
    for what, models in (("attention", [model, model]), ("kl", [model, model]), ("knockout", [model])):
        output = tmp_path / f"{what}.html"
        assert main(["analyze", what, "--models", *models, "--targets", str(path), "--output", str(output)]) == 0
        assert output.is_file()
    out = capsys.readouterr().out
    assert "(request, prefill) pairs from advbench.csv" in out and "harmful requests of advbench.csv" in out
    # Refusal tokens come from the model's own tokenizer: the world's word-level one has none of the
    # openers of real chat models, and says so instead of ranking its unknown token.
    assert main(["analyze", "ranks", "--models", model, "--targets", str(path), "--output",
                 str(tmp_path / "r.html")]) == 2
    assert "none of the refusal phrases of advbench.csv is a token of this tokenizer" in capsys.readouterr().err
    assert main(["analyze", "ablate", "--models", model, "--targets", str(path), "--output",
                 str(tmp_path / "x.html")]) == 2
    assert "analyze ablate needs --world" in capsys.readouterr().err
