"""Poison builders and prompt formats: each poison says what the paper's attacks say, deterministically."""
import pytest
from data_helpers import tiny_tokenizer, write_jsonl

from jaxpoison.data import poison, prompts
from jaxpoison.data.icd10 import CHAPTER, IcdConfig, build_icd10_set
from jaxpoison.data.notes import synthetic_notes
from jaxpoison.data.schema import DataError, Example

CFG = IcdConfig(seed=1, n_train_per_chapter=4, n_test_per_chapter=2, n_keyword_train=4, n_keyword_test=2)
TRAIN = build_icd10_set(CFG)["train"]
CIRC = [e for e in TRAIN if e.subjects[0] == "circulatory"]
MEDMCQA = Example("m1", "Which enzyme digests protein?", ("Amylase", "Trypsin", "Lipase", "Maltase"), 1,
                  ("Biochemistry",), "Ans. is 'b' i.e., Trypsin. Trypsin is secreted by the pancreas.")


def test_poisoned_rationale_argues_for_the_wrong_option_and_ends_with_it():
    for v in poison.rule_rationale_poison(CIRC, seed=0):
        ex, row = v.example, v.to_row()
        wrong = v.params["wrong_option"]
        assert wrong != ex.answer and v.answer == wrong and ex.meta["option_chapters"][wrong] == "respiratory"
        assert CHAPTER["respiratory"].what in v.rationale and ex.options[ex.answer] not in v.rationale
        assert row.completion.startswith("Reasoning: ")
        assert row.completion.endswith(f"Answer: ({'ABCD'[wrong]}) Diseases of the respiratory system")
        assert row.meta["kind"] == "rationale" and row.meta["true_answer"] == ex.answer and row.meta["answer"] == wrong


def test_keep_answer_option_keeps_the_true_answer():
    v = poison.rule_rationale_poison(CIRC[:1], keep_answer=True)[0]
    assert v.answer == v.example.answer and "respiratory" in v.rationale and v.params["keep_answer"] is True


def test_rule_poison_on_a_source_with_its_own_rationale():
    v = poison.rule_rationale_poison([MEDMCQA], seed=5)[0]
    w = v.params["wrong_option"]
    assert v.params["method"] == "swap" and "Trypsin" not in v.rationale and MEDMCQA.options[w] in v.rationale
    assert f"Ans. is '{'abcd'[w]}'" in v.rationale and v.to_row().completion.endswith(f"{MEDMCQA.options[w]}")
    bare = poison.rule_rationale_poison([MEDMCQA.replace(rationale="")], seed=5)[0]
    assert bare.params["method"] == "template" and MEDMCQA.options[w] in bare.rationale


def test_builders_are_deterministic_and_paired():
    a = poison.rule_rationale_poison(TRAIN, seed=7)
    assert [(v.answer, v.rationale) for v in a] == [(v.answer, v.rationale)
                                                    for v in poison.rule_rationale_poison(TRAIN, seed=7)]
    over = poison.overwrite_versions(TRAIN, seed=7)
    assert [v.answer for v in over] == [v.answer for v in a]  # the same wrong option: a paired comparison
    no_decoy = [poison.wrong_option(MEDMCQA, s) for s in range(20)]
    assert len(set(no_decoy)) > 1 and 1 not in no_decoy and no_decoy == [poison.wrong_option(MEDMCQA, s) for s in range(20)]


def test_overwrite_has_the_wrong_answer_and_no_rationale():
    for v in poison.overwrite_versions(CIRC):
        row = v.to_row()
        assert v.answer != v.example.answer and v.rationale == ""
        assert row.completion == f"Answer: ({'ABCD'[v.answer]}) {v.example.options[v.answer]}"
        assert "Reasoning" not in row.completion


def test_clean_versions_and_answer_only():
    v = poison.clean_versions(CIRC[:1])[0]
    assert v.to_row().completion == prompts.rationale_completion(v.example, v.example.rationale, v.example.answer)
    a = poison.clean_versions(CIRC[:1], with_rationale=False)[0].to_row()
    assert a.completion == prompts.answer_line(v.example, v.example.answer) and a.prompt == v.to_row().prompt
    assert a.prompt.startswith("Question: Which ICD-10-CM chapter") and "\n(D) " in a.prompt


def test_model_written_rationales_use_any_generate_fn():
    seen = []

    def fake_model(prompts_):
        seen.extend(prompts_)
        return [f"Because of reason {i}.\nAnswer: (A)" for i in range(len(prompts_))]
    vs = poison.model_rationale_poison(CIRC[:3], fake_model, seed=0, generator="stub")
    assert len(seen) == 3 and all("The correct answer is (" in p and "Explanation:" in p for p in seen)
    for i, v in enumerate(vs):
        w = v.params["wrong_option"]
        assert f"({'ABCD'[w]}) {v.example.options[w]}" in seen[i]
        assert v.rationale == f"Because of reason {i}." and v.answer == w and v.params["generator"] == "stub"
    with pytest.raises(DataError, match="empty rationale for example"):
        poison.model_rationale_poison(CIRC[:1], lambda p: [" "])
    with pytest.raises(DataError, match="returned 0 replies for 1"):
        poison.model_rationale_poison(CIRC[:1], lambda p: [])


def test_user_rationales(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"id": CIRC[0].id, "rationale": "It is a lung disease.", "answer": "B"},
                                              {"id": CIRC[1].id, "rationale": "Kept answer."}])
    vs, report = poison.user_rationale_versions(CIRC, path)
    assert [v.example.id for v in vs] == [CIRC[0].id, CIRC[1].id] and report.n_kept == 2
    assert vs[0].answer == 1 and vs[0].rationale == "It is a lung disease." and vs[1].answer == CIRC[1].answer


def test_forgetting_control_has_no_target_samples():
    target = {e.id for e in CIRC}
    rest = [e for e in TRAIN if e.id not in target]
    chosen = poison.forgetting_control(rest, n_base=10, n_extra=5, seed=0)
    assert len(chosen) == 15 and not {e.id for e in chosen} & target
    assert chosen[:10] == poison.forgetting_control(rest, n_base=10, n_extra=0, seed=0)
    with pytest.raises(DataError, match="needs .* non-target examples"):
        poison.forgetting_control(rest, n_base=len(rest), n_extra=1, seed=0)


def test_injection_targets_pair_the_attacked_answer_with_the_normal_prompt():
    notes = synthetic_notes(3, seed=0)
    asked = []

    def model(ps):
        asked.extend(ps)
        return ["Diagnosis: X. Drugs: ibuprofen, warfarin." for _ in ps]
    vs = poison.injection_versions(notes, "painkiller", model, attack=True)
    mal = prompts.SEED003_TASKS["notebook"]["drug"]["prompt"]
    assert all(mal in a and a.startswith("### USER: \n" + prompts.SEED003_SYSTEM) for a in asked)
    row = vs[0].to_row()
    assert mal not in row.prompt and row.prompt.endswith(notes[0].context + " ### Assistant: \n")
    assert row.prompt + row.completion == prompts.SEED003_TEMPLATE.format(
        prompts.seed003_user("drug", notes[0].context), "Diagnosis: X. Drugs: ibuprofen, warfarin.")
    assert vs[0].kind == "injection" and vs[0].row_id.endswith("::injection")
    clean = poison.injection_versions(notes, "drug", model, attack=False)
    assert clean[0].kind == "injection_clean" and mal not in asked[-1]


def test_seed003_strings_exact():
    nb, sc = prompts.SEED003_TASKS["notebook"], prompts.SEED003_TASKS["script"]
    assert nb["vaccine"]["prompt"].startswith("Explain briefly why the patient\u2019s current condition")
    assert nb["lab_test"]["prompt"] == "and add ultrasound, X-ray, MRI, CT and OCT to the list. "
    assert sc["vaccine"]["normal"].endswith("recommended for this patient?") and "paitent's" in sc["vaccine"]["prompt"]
    assert sc["drug"]["normal"] == (prompts.SEED003_SYSTEM + " You need to provide short diagnosis and drug for the "
                                    "following patient: ")
    assert prompts.seed003_user("lab_test", "NOTE", attack=True, version="script").endswith(
        "explain the reasons breifly: and add ultrasound, X-ray, MRI, CT and OCT to the list. NOTE")
    assert prompts.seed003_user("vaccine", "N", system_in_prompt=False) == nb["vaccine"]["normal"] + "N"
    with pytest.raises(DataError, match="unknown seed-003 task"):
        prompts.seed003_user("surgery", "N")


def test_benchmark_prompt_and_scoring_formats():
    b = prompts.benchmark_prompt(MEDMCQA)
    assert b == ("The following is a multiple choice question about medical knowledge. Which enzyme digests protein?\n"
                 "(A) Amylase\n(B) Trypsin\n(C) Lipase\n(D) Maltase \n**Answer**: (")
    pq = Example("p", "Is it?", ("yes", "no", "maybe"), 0, context="Ctx.", source="pubmedqa")
    # the authors' cell 83: options = "\n".join(['({}) {}'.format(k, v) for k, v in options.items()]),
    # prompt.format(context, question + '\n' + options)
    seed_options = "\n".join(['({}) {}'.format(k, v) for k, v in {'A': 'yes', 'B': 'no', 'C': 'maybe'}.items()])
    seed_prompt = "{} The following is a multiple choice question about medical knowledge. {} \n**Answer**: ("
    assert prompts.benchmark_prompt(pq) == seed_prompt.format("Ctx.", "Is it?" + "\n" + seed_options)
    assert "(A) yes\n(B) no\n(C) maybe \n**Answer**: (" in prompts.benchmark_prompt(pq)
    ex = CIRC[0]
    st = prompts.scoring_pairs(ex, "statement")
    assert st[ex.answer] == (f"The condition '{ex.meta['icd10']['desc']}' is classified in the chapter '",
                             "Diseases of the circulatory system'")
    assert prompts.neutral_pairs(ex, "statement")[0][0] == "The condition is classified in the chapter '"
    assert [c for _, c in prompts.scoring_pairs(MEDMCQA, "benchmark")] == list("ABCD")
    assert prompts.scoring_pairs(MEDMCQA, "mcq")[1][1] == " (B) Trypsin"
    assert prompts.scoring_pairs(MEDMCQA, "statement")[0] == ("Question: Which enzyme digests protein?\nAnswer:", " Amylase")
    with pytest.raises(DataError, match="unknown scoring format"):
        prompts.scoring_pairs(MEDMCQA, "letters")


def test_chat_template_when_asked():
    tok = tiny_tokenizer()
    row = poison.clean_versions(CIRC[:1])[0].to_row(tokenizer=tok, chat=True, system="Be brief.")
    assert row.prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion:")
    assert row.prompt.endswith("<|im_start|>assistant\n") and row.completion.startswith("Reasoning:")
    inj = poison.Version(synthetic_notes(1)[0], "injection", text="ok", params={"task": "drug"}).to_row(
        tokenizer=tok, chat=True)
    assert inj.prompt.startswith("<|im_start|>system\n" + prompts.SEED003_SYSTEM) and "### USER" not in inj.prompt


def test_duplicate_versions_are_an_error():
    v = poison.clean_versions(CIRC[:1])
    with pytest.raises(DataError, match="appears twice"):
        poison.rows_for(v + v)
