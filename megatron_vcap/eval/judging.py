"""Judge calls of the benchmark protocols: AutoDQ (DREAM-1K, CAREBENCH) and VDCscore (VDC).

Every call goes through the project's OpenAI-compatible judge client (bounded concurrency,
retries, the on-disk answer cache keyed by judge model and rendered prompt) as a free-form task:
no JSON schema is sent (the official judges, e.g. GPT-3.5-0125, take none) and the answer is read
in the protocol's own format after the protocol's clean-up (:func:`clean_answer`). An answer that
stays unusable after the retries (official: 10) fails its sample, which is dropped and counted,
never scored 0.

AutoDQ per sample: extract the prediction's items (and the reference's, when the data ships no
list), then two entailment calls: ground-truth items against the prediction (recall) and
prediction items against the lower-cased reference (precision). Only "entailment" counts, and an
empty list scores 1.0 on its side without a call.
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import re
import sys
from collections.abc import Awaitable
from typing import Any

from megatron_vcap.eval.readers import EvalSample, Prediction
from megatron_vcap.eval.templates import Template
from megatron_vcap.rewards.judges.base import JudgeError
from megatron_vcap.rewards.prompts import InvalidAnswer, JudgeTask

log = logging.getLogger(__name__)

RELATIONSHIPS = ("entailment", "neutral", "contradiction")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")


# ------------------------------------------------------------------------------ clean-up
def clean_answer(text: str) -> str:
    """The protocols' clean-up of a judge answer before parsing: strip whitespace and code
    fences, collapse whitespace, drop prose around the outermost ``{...}``, add a missing outer
    brace, ``}{`` -> ``},{`` and no trailing commas."""
    text = re.sub(r"\s+", " ", _FENCE.sub("", text.strip()).strip())
    if text.startswith(("'", '"')):  # '"events": [...]}' lost its opening brace
        text = "{" + text
    start = text.find("{")
    if start >= 0 and not text.startswith("["):
        text = text[start:]
        missing = text.count("{") - text.count("}")
        if missing > 0:
            text += "}" * missing
        text = text[: text.rfind("}") + 1]
    text = re.sub(r"\}\s*\{", "},{", text)
    return _TRAILING_COMMA.sub(r"\1", text)


def decode_loose(text: str) -> Any:
    """JSON after :func:`clean_answer`, falling back to a Python literal (``{'pred': 'yes'}``)."""
    cleaned = clean_answer(text)
    try:
        return json.loads(re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", cleaned)))
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", cleaned)))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
        raise InvalidAnswer(f"neither JSON nor a Python literal: {cleaned[:120]!r}") from exc


def normalise_caption(text: str) -> str:
    """What AutoDQ sends for a caption: lower-cased, double quotes turned into single ones."""
    return text.lower().replace('"', "'").strip()


# ------------------------------------------------------------------------------ tasks
def _list_field(obj: Any, kind: str) -> list:
    if isinstance(obj, list):
        return obj
    if not isinstance(obj, dict):
        raise InvalidAnswer(f"expected an object with '{kind}', got {type(obj).__name__}")
    if isinstance(obj.get(kind), list):
        return obj[kind]
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(lists) != 1:
        raise InvalidAnswer(f"no '{kind}' list in the answer")
    return lists[0]


def extraction_task(template: Template, description: str, kind: str, max_items: int) -> JudgeTask:
    """Items (``kind`` = events / objects) of a description, at most ``max_items``."""

    def parse(obj: Any) -> list[str]:
        items = _list_field(obj, kind)
        if not all(isinstance(i, str) for i in items):
            raise InvalidAnswer(f"{kind}: expected a list of strings")
        return [i.strip() for i in items if i.strip()][:max_items]

    msgs = template.render(description=description, max_items=max_items)
    return JudgeTask(f"autodq_extract_{kind}", msgs, None, parse, decode=decode_loose)


def entailment_task(template: Template, description: str, items: list[str], kind: str):
    """One {item, relationship, reason} per item; the answer must list exactly len(items).
    Verdicts are matched to items by position (the answer's own copy of an item's text is not
    compared: judges paraphrase it)."""

    def parse(obj: Any) -> list[dict[str, str]]:
        answers = _list_field(obj, kind)
        if len(answers) != len(items):
            raise InvalidAnswer(f"{kind}: {len(answers)} verdicts for {len(items)} items")
        out = []
        for pos, ans in enumerate(answers):
            if not isinstance(ans, dict) or not isinstance(ans.get("relationship"), str):
                raise InvalidAnswer(f"{kind}[{pos}]: no 'relationship'")
            rel = ans["relationship"].strip().lower()
            if rel not in RELATIONSHIPS:
                raise InvalidAnswer(f"{kind}[{pos}].relationship: {rel!r} not in {RELATIONSHIPS}")
            out.append(
                {"item": items[pos], "relationship": rel, "reason": str(ans.get("reason", ""))}
            )
        return out

    listed = "\n".join(f"{i + 1}. {item}" for i, item in enumerate(items))
    msgs = template.render(description=description, items=listed)
    return JudgeTask(f"autodq_entail_{kind}", msgs, None, parse, decode=decode_loose)


def _short_answer(text: str) -> str:
    text = _FENCE.sub("", text.strip()).strip()
    if not text:
        raise InvalidAnswer("empty answer")
    return text


def vdc_answer_task(template: Template, caption: str, question: str) -> JudgeTask:
    msgs = template.render(caption=caption, question=question)
    return JudgeTask("vdc_answer", msgs, None, lambda v: v, decode=_short_answer)


def vdc_judge_task(template: Template, question: str, answer: str, prediction: str):
    def parse(obj: Any) -> tuple[str, int]:
        if not isinstance(obj, dict) or "pred" not in obj or "score" not in obj:
            raise InvalidAnswer("expected {'pred': 'yes'|'no', 'score': 0..5}")
        pred = str(obj["pred"]).strip().lower()
        if pred not in ("yes", "no"):
            raise InvalidAnswer(f"pred: {obj['pred']!r} is not yes / no")
        try:
            score = float(obj["score"])
        except (TypeError, ValueError):
            raise InvalidAnswer(f"score: {obj['score']!r} is not a number") from None
        if not 0 <= score <= 5 or score != int(score):
            raise InvalidAnswer(f"score: {obj['score']!r} is not an integer in 0..5")
        return pred, int(score)

    msgs = template.render(question=question, answer=answer, prediction=prediction)
    return JudgeTask("vdc_judge", msgs, None, parse, decode=decode_loose)


# ------------------------------------------------------------------------------ per sample
def compute_share(verdicts: list[dict[str, str]]) -> float:
    """Share of "entailment" verdicts; an empty list scores 1.0."""
    if not verdicts:
        return 1.0
    return sum(v["relationship"] == "entailment" for v in verdicts) / len(verdicts)


async def judge_autodq(
    judge, templates: dict[str, Template], sample: EvalSample, pred: Prediction, kind: str,
    max_items: int = 10,
) -> dict[str, Any]:  # fmt: skip
    """Recall and precision of one caption for ``kind`` (events / objects)."""
    extract_t, entail_t = templates[f"autodq_extract_{kind}"], templates[f"autodq_entail_{kind}"]
    caption = normalise_caption(pred.caption)
    reference = sample.reference.lower()

    async def gt_items() -> list[str]:
        items = sample.gt_items.get(kind)
        if items is not None:
            return items
        return await judge.run(
            extraction_task(extract_t, normalise_caption(sample.reference), kind, max_items)
        )

    async def recall_side() -> tuple[list[str], list]:
        items = await gt_items()
        verdicts = await judge.run(entailment_task(entail_t, caption, items, kind)) if items else []
        return items, verdicts

    async def precision_side() -> tuple[list[str], list]:
        items = await judge.run(extraction_task(extract_t, caption, kind, max_items))
        verdicts = (
            await judge.run(entailment_task(entail_t, reference, items, kind)) if items else []
        )
        return items, verdicts

    (gt, r_verdicts), (pred_items, p_verdicts) = await asyncio.gather(
        recall_side(), precision_side()
    )
    return {
        "gt_items": gt,
        "pred_items": pred_items,
        "recall_verdicts": r_verdicts,
        "precision_verdicts": p_verdicts,
        "recall": compute_share(r_verdicts),
        "precision": compute_share(p_verdicts),
    }


async def judge_vdc_sample(judge, templates, sample: EvalSample, pred: Prediction) -> dict:
    """Per-QA answers and verdicts of one (video, type) caption; failed QAs are listed apart."""

    async def one(qa):
        answer = await judge.run(
            vdc_answer_task(templates["vdc_answer"], pred.caption, qa["question"])
        )
        verdict, score = await judge.run(
            vdc_judge_task(templates["vdc_judge"], qa["question"], qa["answer"], answer)
        )
        return {**qa, "prediction": answer, "pred": verdict, "score": score}

    results = await asyncio.gather(*(one(qa) for qa in sample.qa), return_exceptions=True)
    qas, errors = [], []
    for qa, res in zip(sample.qa, results):
        if isinstance(res, JudgeError):
            errors.append({"question": qa["question"], "error": str(res)})
        elif isinstance(res, BaseException):
            raise res
        else:
            qas.append(res)
    out: dict[str, Any] = {"qa": qas, "failed_qa": errors}
    if qas:
        out["accuracy"] = sum(q["pred"] == "yes" for q in qas) / len(qas)
        out["score"] = sum(q["score"] for q in qas) / len(qas)
    return out


# ------------------------------------------------------------------------------ the batch
async def _guard(coro: Awaitable[dict]) -> dict:
    try:
        return await coro
    except JudgeError as exc:
        return {"error": str(exc)}


async def judge_all(judge, jobs: list[Awaitable[dict]], desc: str) -> list[dict]:
    """Run every sample's judging concurrently (the client bounds the requests in flight);
    results in input order, ``{"error": ...}`` for a sample whose answers stayed unusable."""
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=desc, unit="sample", file=sys.stderr, mininterval=1.0)

    async def tracked(coro):
        try:
            return await _guard(coro)
        finally:
            bar.update(1)

    try:
        return list(await asyncio.gather(*(tracked(j) for j in jobs)))
    finally:
        bar.close()
