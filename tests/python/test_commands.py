"""`moetune eval / export / chat / env / --version` (issue 14), on an adapter `moetune train`
wrote for the tiny demo checkpoint (fp32, CPU), each checked against a reference computed the
obvious way: eval against per-record cross-entropy summed by hand; chat against the training
loop's own greedy sampler and a hand-built chat history; export's merged checkpoint against plain
transformers + PEFT, its per-expert adapter against the merged weights minus the base."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("yaml")

import torch  # noqa: E402

from moetune import cli  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from moetune.train.config import make_config
    from moetune.train.demo_model import demo_data_path, save_demo_base
    from moetune.train.loop import train

    root = tmp_path_factory.mktemp("cmd")
    base = save_demo_base(str(root / "base"))
    data = root / "d.jsonl"
    with open(demo_data_path()) as f:
        data.write_text("".join(f.readlines()[:24]))
    cfg = make_config(
        {
            "model": base,
            "data": str(data),
            "dtype": "float32",
            "device": "cpu",
            "max_steps": 3,
            "lr": 2e-2,
            "micro_batch_size": 4,
            "engine_threads": 1,
            "output_dir": str(root / "run"),
            "progress": False,
            "plot": False,
            "tensorboard": False,
            "eval_fraction": 0.0,
        }
    )
    train(cfg, say=lambda *a: None)
    return Path(base), data, root / "run" / "adapter"


def _reference_model(base, adapter):
    """moetune.load_model + PEFT, built directly (not through moetune.commands)."""
    import peft

    import moetune

    model = moetune.load_model(str(base), dtype=torch.float32, num_threads=1, progress=False)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.eval()


def _json_out(capsys, argv):
    rc = cli.main(argv)
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out.strip().splitlines()[-1])


def test_eval_is_the_token_weighted_cross_entropy(run, capsys):
    from transformers import AutoTokenizer

    from moetune.train import data as data_mod

    base, data, adapter = run
    got = _json_out(
        capsys,
        ["eval", "--adapter", str(adapter), "--data", str(data), "--micro-batch-size", "3", "--json", "--no-progress"],
    )
    # The reference: every record alone (no padding), CE summed over its loss tokens by hand.
    tok = AutoTokenizer.from_pretrained(str(base))
    recs = [json.loads(line) for line in open(data) if line.strip()]
    pairs = [data_mod.encode_chat(tok, r["messages"], "assistant") for r in recs]  # the training loss mask
    enc = {"input_ids": [p[0][:1024] for p in pairs], "labels": [p[1][:1024] for p in pairs]}
    model = _reference_model(base, adapter)
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in zip(enc["input_ids"], enc["labels"]):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].double()
            y = torch.tensor(labels[1:])
            keep = y != data_mod.IGNORE
            total += torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum").item()
            count += int(keep.sum())
    ref = total / count
    assert got["records"] == len(enc["input_ids"]) and got["loss_tokens"] == count
    # fp32 logits; batching (padding, other rows) changes the summation order only.
    assert abs(got["loss"] - ref) <= 1e-5 * ref, (got["loss"], ref)
    assert got["perplexity"] == pytest.approx(torch.tensor(ref).exp().item(), rel=1e-5)
    # The adapter is applied: the base alone scores differently (worse: the adapter trained on these).
    plain = _json_out(
        capsys, ["eval", "--model", str(base), "--dtype", "float32", "--data", str(data), "--json", "--no-progress"]
    )
    assert plain["loss"] > got["loss"] * 1.01
    assert torch.is_grad_enabled()  # commands run in-process leave autograd as they found it


def test_chat_one_shot_and_interactive(run, capsys, monkeypatch):
    from transformers import AutoTokenizer

    from moetune.train.model import generate

    base, _, adapter = run
    q1, q2 = "What does a cow say?", "What is the opposite of hot?"
    rc = cli.main(["chat", "--adapter", str(adapter), "--prompt", q1, "--prompt", q2, "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    model = _reference_model(base, adapter)
    tok = AutoTokenizer.from_pretrained(str(base))
    ref = generate(model, tok, [q1, q2], 6, torch.device("cpu"))
    assert out.out.strip().splitlines() == ref

    # Interactive: the second turn sees the first; /reset forgets it.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{q1}\n{q2}\n/reset\n{q2}\n/exit\n"))
    rc = cli.main(["chat", "--adapter", str(adapter), "--max-new-tokens", "6"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    a1, a2, a3 = out.out.strip().splitlines()
    assert a1 == ref[0] and a3 == ref[1]
    history = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        y = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
    assert a2 == tok.decode(y[0, x.shape[1] :], skip_special_tokens=True).strip()
    assert torch.is_grad_enabled()


def test_export_merged_and_per_expert(run, tmp_path, capsys):
    import peft
    import transformers
    from safetensors.torch import load_file

    from moetune.hf.merge import per_expert_adapter_deltas

    base, _, adapter = run
    rc = cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-progress"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "warning" not in out.err and "plain HF checkpoint" in out.out
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(plain, str(adapter))
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = pm(input_ids=ids).logits, merged(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()

    rc = cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "pe"), "--layout", "per-expert"])
    assert rc == 0, capsys.readouterr().err
    deltas = per_expert_adapter_deltas(tmp_path / "pe")
    w0 = load_file(str(base / "model.safetensors"))
    w1 = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert any(".experts.3.up_proj" in k for k in deltas) and any("self_attn.q_proj" in k for k in deltas)
    changed = {k[: -len(".weight")] for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed == set(deltas)
    for k, d in deltas.items():
        w = w0[k + ".weight"]
        # merged = W + delta in fp32: W's rounding is the only difference
        assert (w1[k + ".weight"] - w - d).abs().max() <= 4 * EPS32 * w.abs().max(), k

    # An adapter trained on int8 experts warns when merged into the bf16 weights.
    run8 = tmp_path / "run8"
    shutil.copytree(adapter.parent / "adapter", run8 / "adapter")
    cfg = (adapter.parent / "config.yaml").read_text().replace("expert_format: bf16", "expert_format: int8")
    (run8 / "config.yaml").write_text(cfg)
    rc = cli.main(["export", "--adapter", str(run8 / "adapter"), "--out", str(tmp_path / "m8"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0 and "trained on int8 experts" in err and err.count("trained on int8") == 1
    assert cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "m8")]) == 2
    assert "exists" in capsys.readouterr().err


def test_merge_and_save_warns_for_quantized_experts(run, tmp_path):
    import peft

    import moetune
    from moetune.hf.merge import QuantizedMergeWarning

    base, _, adapter = run
    model = moetune.load_model(str(base), dtype=torch.float32, num_threads=1, progress=False, weight_format="int8")
    pm = peft.PeftModel.from_pretrained(model, str(adapter))
    with pytest.warns(QuantizedMergeWarning, match="trained on int8 experts"):
        moetune.merge_and_save(pm, tmp_path / "m", progress=False)


def test_env_and_version(capsys):
    import moetune

    env = _json_out(capsys, ["env", "--json"])
    assert env["moetune"] == moetune.__version__ and env["packages"]["torch"].split("+")[0] in torch.__version__
    assert (
        env["cpu"]["isa"] == moetune.Context(1).info()["isa"] and env["cuda"]["available"] == torch.cuda.is_available()
    )
    assert env["cpu"]["cores_usable"] == len(os.sched_getaffinity(0))
    assert cli.main(["env"]) == 0
    assert "engine kernel:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"moetune {moetune.__version__}"


def test_serving_with_transformers_peft(run, tmp_path, capsys):
    """docs/SERVING.md's tested path: the adapter in plain transformers + PEFT generates (greedy)
    what the merged checkpoint `moetune export` writes generates, as docs/SERVING.md shows it."""
    import peft
    import transformers

    base, _, adapter = run
    assert cli.main(["export", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--no-progress"]) == 0
    capsys.readouterr()
    tok = transformers.AutoTokenizer.from_pretrained(str(adapter))
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter)
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    for q in ("What does a dog say?", "What is the opposite of up?"):
        inputs = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.no_grad():
            a = model.generate(**inputs, **kw)
            b = merged.generate(**inputs, **kw)
        assert torch.equal(a, b), q
