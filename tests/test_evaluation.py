"""The evaluation harness: metrics against an unbatched reference, padding, in-memory scoring, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from simmerge.errors import CheckpointError, NotFoundError, SimMergeError
from simmerge.evaluation import (
    Example,
    Task,
    encode_example,
    evaluate_checkpoint,
    evaluate_model,
    evaluate_state_dict,
    load_model,
    load_model_with_state_dict,
    load_probes,
    load_task,
    load_tasks,
    pad_batch,
)


def _reference(model, tokenizer, task):
    """One example at a time, no padding: (token accuracy, mean log-likelihood, exact match)."""
    correct = total = 0
    loglik = 0.0
    matches = 0
    with torch.no_grad():
        for example in task.examples:
            prompt, completion = encode_example(tokenizer, example)
            ids = torch.tensor([prompt + completion])
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
            for i, token in enumerate(completion):
                row = logprobs[len(prompt) - 1 + i]
                correct += int(row.argmax()) == token
                loglik += float(row[token])
            total += len(completion)
            generated = list(prompt)
            for _ in completion:
                generated.append(int(model(input_ids=torch.tensor([generated])).logits[0, -1].argmax()))
            matches += generated[len(prompt) :] == completion
    return correct / total, loglik / total, matches / len(task.examples)


@pytest.fixture(scope="module")
def zoo_model(ci_zoo):
    model, tokenizer = load_model(ci_zoo / "checkpoints" / "a-reverse-1")
    tasks = {t.name: t for t in load_tasks(ci_zoo)}
    return model, tokenizer, tasks


@pytest.mark.parametrize("task_name", ["reverse", "sort"])
def test_metrics_match_an_unbatched_reference(zoo_model, task_name):
    model, tokenizer, tasks = zoo_model
    task = Task(task_name, tasks[task_name].examples[:24])
    accuracy, loglik, exact = _reference(model, tokenizer, task)
    assert evaluate_model(model, tokenizer, [task], "token_accuracy", batch_size=7)[task_name] == accuracy
    assert evaluate_model(model, tokenizer, [task], "exact_match", batch_size=7)[task_name] == exact
    assert evaluate_model(model, tokenizer, [task], "loglik", batch_size=7)[task_name] == pytest.approx(
        loglik, abs=1e-4
    )
    assert loglik < 0


def test_scores_do_not_depend_on_batch_size_or_padding_side(zoo_model):
    model, tokenizer, tasks = zoo_model
    # prompts of several lengths in each batch
    chosen = [Task(n, tasks[n].examples[:20]) for n in ("reverse", "copy", "sort")]
    for metric in ("token_accuracy", "exact_match", "loglik"):
        runs = [evaluate_model(model, tokenizer, chosen, metric, batch_size=n) for n in (1, 5, 64)]
        runs.append(evaluate_model(model, tokenizer, chosen, metric, batch_size=5, padding_side="left"))
        for other in runs[1:]:
            for name, score in runs[0].items():
                if metric == "loglik":
                    assert other[name] == pytest.approx(score, abs=1e-4)
                else:
                    assert other[name] == score, (metric, name)


def test_left_padding_gets_positions_of_the_unpadded_sequence():
    ids, mask, positions = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions[1, 2] == 0 and positions[0].tolist() == [0, 1, 2]
    with pytest.raises(SimMergeError, match="middle"):
        pad_batch([[1]], 0, side="middle")


def test_in_memory_weights_score_like_the_checkpoint_on_disk(ci_zoo):
    directory = ci_zoo / "checkpoints" / "a-sort-1"
    tasks = load_tasks(ci_zoo, ["sort", "reverse"])
    state = load_file(str(directory / "model.safetensors"))
    for metric in ("token_accuracy", "loglik"):
        assert evaluate_state_dict(directory, state, tasks, metric) == evaluate_checkpoint(
            directory, tasks, metric
        )


def test_merged_state_dict_scores_like_the_written_merge(ci_zoo, tmp_path):
    from simmerge.engine import merge_state_dict, run_merge
    from simmerge.plan import Plan

    sources = [str(ci_zoo / "checkpoints" / name) for name in ("a-reverse-1", "a-sort-1")]
    plan = Plan.single("linear", sources, model_parameters=[{"weight": 0.5}, {"weight": 0.5}])
    out = run_merge(plan, tmp_path / "merged", progress=False).out_dir
    tasks = load_tasks(ci_zoo, ["reverse", "sort"])
    in_memory = evaluate_state_dict(sources[0], merge_state_dict(plan), tasks)
    assert in_memory == evaluate_checkpoint(out, tasks)


def test_tied_embeddings_load_from_a_state_dict_without_lm_head(tiny_llama_factory):
    directory = tiny_llama_factory("tied", tie=True, tokenizer=True)
    state = load_file(str(directory / "model.safetensors"))
    assert "lm_head.weight" not in state
    model = load_model_with_state_dict(directory, state)
    assert torch.equal(model.lm_head.weight, state["model.embed_tokens.weight"])
    task = Task("copy", (Example("copy : a b =", " a b"),))
    scores = evaluate_state_dict(directory, state, [task], "loglik")
    assert scores == evaluate_checkpoint(directory, [task], "loglik")


def test_state_dict_missing_or_unknown_tensor_is_an_error(tiny_llama_factory):
    directory = tiny_llama_factory("m", tokenizer=True)
    state = load_file(str(directory / "model.safetensors"))
    missing = {k: v for k, v in state.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model_with_state_dict(directory, missing)
    wrong = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight"):
        load_model_with_state_dict(directory, wrong)
    with pytest.raises(CheckpointError, match=r"extra\.weight"):
        load_model_with_state_dict(directory, {**state, "extra.weight": torch.zeros(1)})


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'],
            r"bad\.jsonl:2: field 'completion' is missing",
        ),
        (['{"prompt": "a", "completion": "b"}', "", "{oops"], r"bad\.jsonl:3: not valid JSON"),
        (['{"prompt": "a", "completion": 3}'], r"bad\.jsonl:1: field 'completion' is not a string"),
        (["[1, 2]"], r"bad\.jsonl:1: expected a JSON object"),
        ([""], r"bad\.jsonl: task file has no examples"),
    ],
)
def test_bad_task_files_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SimMergeError, match=message):
        load_task(path)


def test_probe_files_are_checked_too(tmp_path):
    path = tmp_path / "probes.jsonl"
    path.write_text("\n")
    with pytest.raises(SimMergeError, match=r"probes\.jsonl: probe file has no probes"):
        load_probes(path)
    path.write_text('{"text": "a b"}\n{"txt": "c"}\n')
    with pytest.raises(SimMergeError, match=r"probes\.jsonl:2: field 'text' is missing"):
        load_probes(path)
    with pytest.raises(NotFoundError, match=r"nowhere\.jsonl"):
        load_probes(tmp_path / "nowhere.jsonl")


def test_task_sources_and_selection(tmp_path, ci_zoo):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "alpha.jsonl").write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n")
    (folder / "beta.jsonl").write_text(json.dumps({"prompt": "q", "completion": " d"}) + "\n")
    assert [t.name for t in load_tasks(folder)] == ["alpha", "beta"]
    assert [t.name for t in load_tasks(folder / "beta.jsonl")] == ["beta"]
    zoo_tasks = {t.name: t for t in load_tasks(ci_zoo)}
    assert zoo_tasks["copy"].held_out and not zoo_tasks["reverse"].held_out
    with pytest.raises(NotFoundError, match="'gamma'"):
        load_tasks(folder, ["gamma"])
    model, tokenizer = load_model(ci_zoo / "checkpoints" / "a-base")
    with pytest.raises(SimMergeError, match="prompt '' has no tokens"):
        evaluate_model(model, tokenizer, [Task("t", (Example("", " a"),))])
    with pytest.raises(SimMergeError, match="completion ' ' of prompt 'copy : a =' has no tokens"):
        evaluate_model(model, tokenizer, [Task("t", (Example("copy : a =", " "),))])
    with pytest.raises(SimMergeError, match="f1"):
        evaluate_model(None, None, [zoo_tasks["copy"]], "f1")


def test_eval_command_prints_scores_as_json(ci_zoo, tmp_path):
    from simmerge.cli import cli

    runner = CliRunner()
    args = ["eval", str(ci_zoo / "checkpoints" / "a-shift-1"), "--tasks", str(ci_zoo), "--task", "shift"]
    result = runner.invoke(cli, [*args, "--home", str(tmp_path / "home"), "--batch-size", "9"])
    assert result.exit_code == 0, result.output
    assert result.stdout.lstrip().startswith("{")
    scores = json.loads(result.stdout)
    assert list(scores) == ["shift"] and scores["shift"] >= 0.9
    result = runner.invoke(cli, [*args, "--metric", "loglik", "--home", str(tmp_path / "home")])
    assert math.isfinite(json.loads(result.stdout)["shift"]) and json.loads(result.stdout)["shift"] < 0
    home = tmp_path / "named"
    assert runner.invoke(cli, ["catalog", "import", str(ci_zoo), "--home", str(home)]).exit_code == 0
    named = ["eval", "a-shift-1", "--tasks", str(ci_zoo), "--task", "shift", "--home", str(home)]
    by_name = runner.invoke(cli, named)
    assert by_name.exit_code == 0, by_name.output
    assert json.loads(by_name.stdout) == scores
    result = runner.invoke(
        cli, ["eval", "no-such-model", "--tasks", str(ci_zoo), "--home", str(tmp_path / "h")]
    )
    assert isinstance(result.exception, NotFoundError) and "no-such-model" in str(result.exception)
