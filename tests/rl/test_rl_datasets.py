"""RL datasets (runtime/rl/datasets.py): parquet / JSONL / save_to_disk / data-file folders, the column mapping,
splits, seeded subsets, prompt templates, the columns reaching reward functions, the Countdown and math rewards,
the offline error for a Hub name, and one short GRPO and one DPO run from a parquet file.

Nothing here touches the network: every test runs with the Hub offline and a datasets cache in tmp_path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcpc.errors import UserError
from pcpc.runtime.rl.datasets import (
    DatasetSection, load_pair_records, load_prompts, load_rows, subset_indices, text_of,
)
from pcpc.runtime.rl.rewards import (
    RewardSet, countdown, countdown_equation_ok, final_answer, math_exact_match, normalize_answer,
)
from pcpc.runtime.rl.setup import ByteTokenizer
from runs import run_config_file

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
MATH = {
    "problem": [f"{a}+{b}=" for a, b in zip(range(1, 11), range(20, 30))],
    "solution": [str(a + b) for a, b in zip(range(1, 11), range(20, 30))],
    "id": list(range(10)),
}
TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    """The Hub offline and the datasets cache in tmp_path, for this process (datasets reads its environment
    once, at import) and for the processes a run spawns."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def write_parquet(path: Path, data: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(data).to_parquet(str(path))
    return path


def section(**kw) -> DatasetSection:
    return DatasetSection(**kw)


# ---------------------------------------------------------------------------
# sources, columns, splits, subsets


def test_parquet_prompts_follow_the_column_mapping_and_the_seeded_subset(tmp_path):
    path = write_parquet(tmp_path / "math.parquet", MATH)
    d = section(path=str(path), columns={"prompt": "problem", "answer": "solution"}, num_samples=4, seed=3)
    got = load_prompts(d, TOK)
    picked = subset_indices(10, 4, 3)
    assert len(set(picked)) == 4 and picked != [0, 1, 2, 3]
    assert got.ids == [list(MATH["problem"][i].encode()) for i in picked]
    cols = got.columns_for(range(4))
    assert cols["answer"] == [MATH["solution"][i] for i in picked]  # aligned with the prompts
    assert cols["id"] == picked and cols["problem"] == [MATH["problem"][i] for i in picked]
    assert got.columns_for([2, 0, 2]) == {k: [v[2], v[0], v[2]] for k, v in cols.items()}


def test_subsets_are_reproducible(tmp_path):
    path = write_parquet(tmp_path / "math.parquet", MATH)
    ids = lambda **kw: list(load_rows(section(path=str(path), **kw))["id"])  # noqa: E731
    assert ids(num_samples=5, seed=7) == ids(num_samples=5, seed=7) == subset_indices(10, 5, 7)
    assert ids(num_samples=5, seed=7) != ids(num_samples=5, seed=8)
    assert ids(num_samples=3, seed=7) == ids(num_samples=5, seed=7)[:3]  # a smaller subset is a prefix
    assert sorted(ids(seed=1)) == list(range(10))  # no num_samples: the whole split, shuffled
    assert ids(shuffle=False, num_samples=4) == [0, 1, 2, 3]
    assert ids(num_samples=100) == subset_indices(10, None, 0)


def test_jsonl_save_to_disk_and_a_folder_of_data_files(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict(MATH)
    test = datasets.Dataset.from_dict({k: v[:3] for k, v in MATH.items()})
    lines = [json.dumps(dict(zip(MATH, row))) + "\n" for row in zip(*MATH.values())]
    (tmp_path / "math.jsonl").write_text("".join(lines))
    datasets.DatasetDict({"train": ds, "test": test}).save_to_disk(str(tmp_path / "saved"))
    ds.save_to_disk(str(tmp_path / "saved_one"))
    (tmp_path / "folder" / "data").mkdir(parents=True)  # the layout `huggingface-cli download` leaves
    ds.to_parquet(str(tmp_path / "folder" / "data" / "train-00000-of-00001.parquet"))
    test.to_parquet(str(tmp_path / "folder" / "data" / "test-00000-of-00001.parquet"))
    want = list(load_rows(section(path=str(write_parquet(tmp_path / "m.parquet", MATH)), num_samples=6))["problem"])
    for source in ("math.jsonl", "saved", "saved_one", "folder"):
        got = load_rows(section(path=str(tmp_path / source), num_samples=6))
        assert list(got["problem"]) == want, source
        assert got.column_names == ["problem", "solution", "id"]
    for source in ("saved", "folder"):
        rows = load_rows(section(path=str(tmp_path / source), split="test", shuffle=False))
        assert list(rows["id"]) == [0, 1, 2], source
    with pytest.raises(UserError, match=r"dataset.split: .*saved has no split 'val'; its splits: train, test"):
        load_rows(section(path=str(tmp_path / "saved"), split="val"))
    with pytest.raises(UserError, match=r"dataset.split: .*Unknown split \"val\""):
        load_rows(section(path=str(tmp_path / "folder"), split="val"))
    with pytest.raises(UserError, match=r"dataset.split: .*math.jsonl is one file, whose only split is \"train\""):
        load_rows(section(path=str(tmp_path / "math.jsonl"), split="test"))


def test_a_relative_path_is_found_next_to_the_config(tmp_path, monkeypatch):
    write_parquet(tmp_path / "math.parquet", MATH)
    monkeypatch.chdir(tmp_path.parent)
    assert len(load_rows(section(path="math.parquet"), config_dir=tmp_path)) == 10
    with pytest.raises(UserError, match=r"dataset.path: nowhere.parquet not found"):
        load_rows(section(path="nowhere.parquet"), config_dir=tmp_path)


@pytest.mark.parametrize("kw,match", [
    ({"columns": {"prompt": "question"}},
     r"dataset.columns.prompt: .*math.parquet \(split train\) has no column 'question'; its columns: problem, "
     r"solution, id"),
    ({}, r"dataset.columns.prompt: .* has no column 'prompt' \(the default; set dataset.columns.prompt to the column"),
    ({"columns": {"prompt": "problem", "answer": "answers"}}, r"dataset.columns.answer: .* no column 'answers'"),
    ({"columns": {"prompt": "problem", "nums": "numbers"}}, r"dataset.columns.nums: .* no column 'numbers'"),
    ({"prompt_template": "What is {problm}?"}, r"dataset.prompt_template: .* no column 'problm'; its columns"),
])
def test_bad_columns_name_the_field_and_list_the_columns(tmp_path, kw, match):
    path = write_parquet(tmp_path / "math.parquet", MATH)
    with pytest.raises(UserError, match=match):
        load_prompts(section(path=str(path), **kw), TOK)


def test_unreadable_sources_are_one_line_errors(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{bad\n')
    (tmp_path / "bad.parquet").write_text("not parquet")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    write_parquet(tmp_path / "folder" / "train.parquet", MATH)
    for kw, match in [
        ({"path": str(tmp_path / "bad.jsonl")}, r"dataset.path: .*bad.jsonl: ArrowInvalid: JSON parse error"),
        ({"path": str(tmp_path / "bad.parquet")}, r"dataset.path: .*bad.parquet: ArrowInvalid: .*Parquet magic bytes"),
        ({"path": str(tmp_path / "notes.txt")}, r"notes.txt: not a directory nor a .parquet, .jsonl, .json, .csv file"),
        ({"path": str(tmp_path / "folder"), "subset": "nosuch"}, r"dataset.subset: .*folder: .*'nosuch' not found"),
    ]:
        with pytest.raises(UserError, match=match):
            load_rows(section(**kw))


def test_dpo_pairs_from_renamed_columns(tmp_path):
    path = write_parquet(tmp_path / "prefs.parquet", {"q": ["1+1=", "2+2="], "good": ["2", "4"], "bad": ["3", "5"]})
    d = section(path=str(path), columns={"prompt": "q", "chosen": "good", "rejected": "bad"}, shuffle=False)
    assert load_pair_records(d) == [
        (f"dataset {path} row 0", {"prompt": "1+1=", "chosen": "2", "rejected": "3"}),
        (f"dataset {path} row 1", {"prompt": "2+2=", "chosen": "4", "rejected": "5"}),
    ]
    with pytest.raises(UserError, match=r"dataset.columns.chosen: .* has no column 'chosen' \(the default"):
        load_pair_records(section(path=str(path), columns={"prompt": "q"}))


def test_prompts_get_the_chat_template_as_prompt_files_do(tmp_path):
    """With a HF tokenizer, a dataset prompt is tokenized exactly as setup.ensure_prompts writes a text prompt (the
    chat template, a user turn); chat_template false gives the raw text's tokens."""
    from pcpc.runtime.rl.setup import load_tokenizer
    from qwen_helpers import CHAT_TEMPLATE, _tokenizer

    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    _tokenizer().save(str(tok_dir / "tokenizer.json"))
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE,
                                                               "eos_token": "<|im_end|>"}))
    tok = load_tokenizer(str(tok_dir), "qwen2-tiny")
    path = write_parquet(tmp_path / "math.parquet", MATH)
    d = section(path=str(path), columns={"prompt": "problem"}, shuffle=False, num_samples=2)
    chat = load_prompts(d, tok).ids
    assert chat == [tok.encode(t) for t in MATH["problem"][:2]]
    assert tok.decode(chat[0]).startswith("user\n1+20=")  # the template's turn (its specials are skipped)
    raw = load_prompts(section(**{**d.__dict__, "chat_template": False}), tok).ids
    assert raw == [tok.encode(t, chat=False) for t in MATH["problem"][:2]] and raw != chat


def test_chat_format_cells_give_their_last_message():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert text_of(messages, "x") == "hello"
    assert text_of([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "x") == "a"
    assert text_of({"role": "assistant", "content": "c"}, "x") == "c"
    with pytest.raises(UserError, match=r"row 3: expected text \(or chat messages\), got int"):
        text_of(5, "row 3")


# ---------------------------------------------------------------------------
# config


def _grpo_raw(**dataset) -> dict:
    return {"model_path": "m/g.mlir", "training_model_path": "m/t.vmfb", "weights_path": "w.bin",
            "grpo_config": {}, "dataset": dataset}


def _dpo_raw(dpo_config: dict, **dataset) -> dict:
    raw = {"training_model_path": "m/t.vmfb", "weights_path": "w.bin", "dpo_config": dpo_config}
    return {**raw, "dataset": dataset} if dataset else raw


def test_the_dataset_section_loads_strictly():
    from pcpc.runtime.rl.dpo_config import parse_dpo
    from pcpc.runtime.rl.grpo_config import parse_grpo

    cfg = parse_grpo(_grpo_raw(name="open-r1/OpenR1-Math-220k", columns={"prompt": "problem"}, num_samples=8))
    assert cfg.dataset == DatasetSection(name="open-r1/OpenR1-Math-220k", columns={"prompt": "problem"}, num_samples=8)
    assert parse_grpo({k: v for k, v in _grpo_raw().items() if k != "dataset"}).dataset is None  # prompt_file runs
    assert parse_dpo(_dpo_raw({}, path="p.parquet")).dpo_config.data_path is None
    cases = [
        (parse_grpo, _grpo_raw(name="a", path="b"), r"config.dataset: give exactly one of name .* and path .*both"),
        (parse_grpo, _grpo_raw(), r"config.dataset: give exactly one of name .*neither"),
        (parse_grpo, _grpo_raw(name="a", rows=3), r"config.dataset: unknown key 'rows'; valid keys: name, path"),
        (parse_grpo, _grpo_raw(name="a", num_samples=0), r"config.dataset: num_samples must be >= 1 or null"),
        (parse_grpo, _grpo_raw(name="a", num_samples="all"), r"dataset.num_samples: expected int or NoneType, got str"),
        (parse_grpo, _grpo_raw(name="a", columns={"prompt": 3}), r"columns.prompt must name a dataset column"),
        (parse_grpo, _grpo_raw(name="a", columns={"completions": "x"}), r"columns: 'completions' cannot be a reward"),
        (parse_grpo, _grpo_raw(name="a", prompt_template="no fields"), r"prompt_template names no column"),
        (parse_grpo, _grpo_raw(name="a", columns={"chosen": "c"}), r"dataset.columns.chosen: GRPO reads prompt"),
        (parse_dpo, _dpo_raw({"data_path": "p.jsonl"}, path="p.parquet"),
         r"config: give the preference pairs once: .*not both"),
        (parse_dpo, _dpo_raw({}), r"config: give the preference pairs once: .*one of them"),
        (parse_dpo, _dpo_raw({}, path="p", columns={"answer": "a"}),
         r"config: dataset.columns.answer: DPO reads only prompt, chosen and rejected"),
    ]
    for parse, raw, match in cases:
        with pytest.raises(UserError, match=match):
            parse(raw)


def test_the_countdown_experiment_loads_and_its_template_fits_the_dataset(tmp_path):
    from pcpc.runtime.rl.grpo_config import parse_grpo

    cfg = parse_grpo(json.loads((EXPERIMENTS / "qwen_grpo_countdown.json").read_text()), "qwen_grpo_countdown.json")
    assert cfg.dataset.name == "Jiayi-Pan/Countdown-Tasks-3to4" and cfg.grpo_config.reward_funcs == ("countdown",)
    # the Hub dataset's columns (target: int, nums: list of ints), as a local copy would hold them
    path = write_parquet(tmp_path / "countdown.parquet", {"target": [98], "nums": [[44, 19, 35]]})
    local = DatasetSection(**{**cfg.dataset.__dict__, "name": None, "path": str(path), "chat_template": False})
    got = load_prompts(local, TOK)
    assert bytes(got.ids[0]).decode().startswith("Using the numbers [44, 19, 35], create an equation that equals 98.")
    RewardSet.from_config(cfg.grpo_config.reward_funcs, None).check_arguments(list(got.arguments))


# ---------------------------------------------------------------------------
# the Hub without a network


def test_a_hub_name_offline_says_what_to_download_and_where_to_point_the_config():
    name = "Jiayi-Pan/Countdown-Tasks-3to4"
    with pytest.raises(UserError) as e:
        load_rows(section(name=name))
    msg = str(e.value)
    assert f"dataset.name: {name} cannot be loaded: no network (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set)" in msg
    assert f"`huggingface-cli download --repo-type dataset {name} --local-dir DIR`" in msg
    assert '"dataset": {"path": "DIR", ...}' in msg


def test_the_cli_exits_2_without_a_traceback(tmp_path):
    cfg = tmp_path / "offline.json"
    raw = {**_toy_grpo(tmp_path), "dataset": {"name": "open-r1/OpenR1-Math-220k"}}
    raw["grpo_config"]["reward_funcs"] = ["default"]
    cfg.write_text(json.dumps(raw))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pcpc.cli", "run", str(cfg), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "open-r1/OpenR1-Math-220k cannot be loaded: no network" in proc.stderr
    assert "huggingface-cli download --repo-type dataset open-r1/OpenR1-Math-220k --local-dir DIR" in proc.stderr
    assert not (tmp_path / "models").exists()  # stopped before building anything


# ---------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize("text,nums,target,ok", [
    ("<think>...</think><answer>(25 - 5) * 4</answer>", [25, 5, 4], 80, True),
    ("<answer>(25 - 5) * 4 = 80</answer>", [4, 25, 5], 80, True),
    ("<answer>100 / (5 - 3) + 2</answer>", [100, 5, 3, 2], 52, True),
    ("<answer>wrong</answer> then <answer>25*4-5*4</answer>", [25, 4, 5, 4], 80, True),  # the last answer counts
    ("<answer>(25 - 5) * 4</answer>", [25, 5, 4, 3], 80, False),  # a number unused
    ("<answer>(25 - 5) * 4 * 1</answer>", [25, 5, 4], 80, False),  # a number not given
    ("<answer>25 * 4 - 5 - 5 - 10</answer>", [25, 4, 5, 10], 80, False),  # 5 used twice
    ("<answer>(25 - 5) * 4</answer>", [25, 5, 4], 81, False),  # wrong value
    ("(25 - 5) * 4", [25, 5, 4], 80, False),  # no answer tags
    ("<answer>2 ** 3</answer>", [2, 3], 8, False),  # only + - * /
    ("<answer>import os</answer>", [1], 1, False),
    ("<answer>4 / (2 - 2)</answer>", [4, 2, 2], 0, False),
    ("<answer>-4 + 8</answer>", [4, 8], 4, False),  # no unary minus
])
def test_countdown_checks_the_equation(text, nums, target, ok):
    assert countdown_equation_ok(text, nums, target) is ok


@pytest.mark.parametrize("completion,answer,score", [
    (r"so the answer is \boxed{42}.", "42", 1.0),
    (r"\boxed{41} no wait \boxed{42}", "42", 1.0),
    (r"\boxed{\frac{1}{2}}", r"\dfrac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    ("<answer> 17 </answer>", "17", 1.0),
    (r"<answer>\boxed{x^2+1}</answer>", "x^2 + 1", 1.0),
    (r"$\boxed{10^\circ}$", "10", 1.0),
    (r"\boxed{3\text{ cm}}", "3cm", 1.0),
    (r"\boxed{42}", r"\boxed{42}", 1.0),  # an answer column in boxed form
    (r"\boxed{7}", ["6", "7"], 1.0),  # several acceptable answers
    (r"\boxed{43}", "42", 0.0),
    ("42", "42", 0.0),  # no final-answer marker
    (r"\boxed{}", "", 0.0),
])
def test_math_exact_match(completion, answer, score):
    assert math_exact_match([completion], [answer]) == [score]


def test_final_answer_takes_whichever_comes_last():
    assert final_answer(r"<answer>1</answer> \boxed{2}") == "2"
    assert final_answer(r"\boxed{2} <answer>1</answer>") == "1"
    assert final_answer(r"\boxed{a{b}c}") == "a{b}c"
    assert final_answer("nothing") is None
    assert normalize_answer(r"$\left( 1, 2 \right)$") == "(1,2)"


def test_dataset_columns_reach_reward_functions(tmp_path):
    (tmp_path / "mine.py").write_text("def f(prompts, completions, answer, **kw):\n"
                                      "    return [float(a == c) + kw['difficulty'][i] for i, (a, c) in "
                                      "enumerate(zip(answer, completions))]\n")
    rs = RewardSet.from_config(["mine.py:f", "countdown", "math_exact_match"], None, tmp_path)
    cols = {"answer": ["4", "5"], "difficulty": [0.5, 0.25], "nums": [[2, 2], [1, 4]], "target": [4, 5]}
    total, per_fn = rs.score(["2+2=", "1+4="], ["4", r"<answer>1 + 4</answer> \boxed{5}"], [[1], [2]], [[1], [2]],
                             [0], cols)
    assert per_fn["mine.py:f"] == [1.5, 0.25]
    assert per_fn["countdown"] == [0.0, 1.0] and per_fn["math_exact_match"] == [0.0, 1.0]
    rs.check_arguments(list(cols))
    with pytest.raises(UserError, match=r"reward function 'math_exact_match' needs answer, which this run does not "
                                        r"supply \(a prompt file gives no columns\).*dataset.columns"):
        RewardSet.from_config(["default", "math_exact_match"], None).check_arguments([])
    with pytest.raises(UserError, match=r"'countdown' needs nums, target, .*the dataset gives id, problem"):
        RewardSet.from_config(["countdown"], None).check_arguments(["problem", "id"])


def test_countdown_rows_with_a_prompt_template(tmp_path):
    """Countdown-Tasks-3to4 has no prompt column: the template makes the prompt, nums and target reach the reward."""
    path = write_parquet(tmp_path / "countdown.parquet", {"target": [80, 52], "nums": [[25, 5, 4], [100, 5, 3, 2]]})
    template = "Using the numbers {nums}, create an equation that equals {target}. Answer in <answer></answer>."
    got = load_prompts(section(path=str(path), prompt_template=template, shuffle=False, chat_template=False), TOK)
    assert bytes(got.ids[0]).decode() == ("Using the numbers [25, 5, 4], create an equation that equals 80. "
                                          "Answer in <answer></answer>.")
    cols = got.columns_for([0, 1])
    assert cols == {"target": [80, 52], "nums": [[25, 5, 4], [100, 5, 3, 2]]}
    texts = ["<answer>(25 - 5) * 4</answer>", "<answer>100 / (5 - 3) + 3</answer>"]
    assert countdown(texts, **cols) == [1.0, 0.0]


# ---------------------------------------------------------------------------
# end to end: a few GRPO iterations and DPO steps from parquet files


RECORDING_REWARD = """import json, os

def record(prompts, completions, answer, **kw):
    with open(os.path.join(os.path.dirname(__file__), "seen.jsonl"), "a") as f:
        for p, a in zip(prompts, answer):
            f.write(json.dumps([p, a]) + "\\n")
    return [float(len(c) > 0) for c in completions]
"""


def _toy_grpo(root: Path) -> dict:
    return {
        "model_path": str(root / "models" / "ds_gen.mlir"),
        "training_model_path": str(root / "models" / "ds_train.vmfb"),
        "weights_path": str(root / "models" / "ds_flat.bin"),
        "tokenizer": "bytes", "model": "qwen2-tiny", "model_overrides": {"num_hidden_layers": 1},
        "init_weights": "random",
        "grpo_config": {"num_iterations": 3, "group_size": 2, "num_prompts": 2, "learning_rate": 0.003,
                        "beta": 0.0, "reward_funcs": ["reward.py:record", "math_exact_match"]},
        "rollout_config": {"max_tokens": 4, "temperature": 1.0, "top_p": 1.0, "batch_size": 4},
    }


def test_grpo_runs_on_a_parquet_dataset_and_its_rewards_get_the_answers(tmp_path):
    write_parquet(tmp_path / "math.parquet", MATH)
    (tmp_path / "reward.py").write_text(RECORDING_REWARD)
    raw = {**_toy_grpo(tmp_path), "dataset": {"path": "math.parquet", "num_samples": 4, "seed": 5,
                                              "columns": {"prompt": "problem", "answer": "solution"}}}
    cfg = tmp_path / "grpo_ds.json"
    cfg.write_text(json.dumps(raw))
    summary = run_config_file(cfg)
    assert summary["iterations"] == 3
    recs = [json.loads(x) for x in (tmp_path / "grpo_ds" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3] and all("reward/math_exact_match" in r for r in recs)
    seen = [json.loads(x) for x in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 3 * 2 * 2  # iterations x prompts x group
    subset = [MATH["problem"][i] for i in subset_indices(10, 4, 5)]
    order = [subset[(it * 2 + j) % 4] for it in range(3) for j in range(2) for _ in range(2)]
    assert [p for p, _ in seen] == order  # the subset, in order, wrapping
    assert all(a == str(eval(p.rstrip("="))) for p, a in seen)  # each completion got its own prompt's answer


def test_dpo_runs_on_a_parquet_dataset(tmp_path):
    pairs = [json.loads(x) for x in (EXPERIMENTS / "dpo_tiny_prefs.jsonl").read_text().splitlines() if x.strip()]
    write_parquet(tmp_path / "prefs.parquet", {"question": [p["prompt"] for p in pairs],
                                               "good": [p["chosen"] for p in pairs],
                                               "bad": [p["rejected"] for p in pairs]})
    raw = json.loads((EXPERIMENTS / "dpo_tiny.json").read_text())
    raw.update(training_model_path=str(tmp_path / "models" / "dpo_ds.vmfb"), weights_path=str(tmp_path / "w.bin"),
               dataset={"path": str(tmp_path / "prefs.parquet"), "num_samples": 8, "seed": 1,
                        "columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}})
    del raw["dpo_config"]["data_path"]
    raw["dpo_config"].update(max_steps=3)
    cfg = tmp_path / "dpo_ds.json"
    cfg.write_text(json.dumps(raw))
    summary = run_config_file(cfg)
    assert summary["steps"] == 3 and summary["pairs"] == 8
    recs = [json.loads(x) for x in (tmp_path / "dpo_ds" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and recs[-1]["loss"] < recs[0]["loss"] + 1e-3
