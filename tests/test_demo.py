"""mosear-demo on its built-in default (the README's first command) and its pieces."""

import torch

from mosear_fast import demo


def test_demo_runs_and_prints_the_table(capsys):
    assert demo.main(["--visual", "40", "--text", "8"]) == 0
    out = capsys.readouterr().out
    for name in ("text", "visual", "audio", "share before AR", "share after AR", "MoSE update norm"):
        assert name in out


def test_after_ar_shares_are_closer_to_balance():
    g = torch.Generator().manual_seed(0)
    layout = demo.build_prompt_layout(8, 64, 2)
    q, k, _ = demo.audio_biased_attention_inputs(layout, heads=4, head_dim=32, audio_pull=1.2, generator=g)
    before, after = demo.attention_shares(q, k, layout[None], strength=0.5, backend="torch")
    assert before[2] > before[1]  # audio-biased
    assert abs(after[2] - after[1]) < abs(before[2] - before[1])
    assert torch.allclose(after.sum(), torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(after[0], before[0], atol=1e-6)  # text is not a balance modality


def test_demo_bad_argument_is_one_line_error(capsys):
    assert demo.main(["--strength", "3"]) == 2
    err = capsys.readouterr().err
    assert "strength" in err and "Traceback" not in err
