"""The continuous-batching engine: every request's tokens equal the request run alone through
`generate`, whatever else shares its steps; cancellation, siblings, failures and limits."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
import torch
from PIL import Image

from conftest import EXAMPLES, SHIPPED, tiny_config_dict
from idefics2 import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
from idefics2.generation.engine import Engine, EngineRequest, QueueFull, SamplingParams, TokenEvent


class Collector:
    """Events of one request, in order; `done` is set once all `n` sequences finished."""

    def __init__(self, n: int = 1) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.events: list[TokenEvent] = []
        self.open = n
        self.done = threading.Event()

    def __call__(self, event: TokenEvent) -> None:
        self.events.append(event)
        if event.token >= 0:
            self.tokens[event.index].append(event.token)
        if event.finish_reason is not None:
            self.open -= 1 if event.finish_reason != "error" else self.open
            if self.open == 0:
                self.done.set()


@pytest.fixture(scope="module")
def shipped() -> tuple[Any, Any]:
    return Idefics2ForConditionalGeneration.from_pretrained(SHIPPED).eval(), Idefics2Processor.from_pretrained(SHIPPED)


def chat_inputs(processor: Any, question: str, images: list[Image.Image]) -> Any:
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
    return processor(images=images or None, text=processor.apply_chat_template(messages, add_generation_prompt=True))


def submit(engine: Engine, inputs: Any, params: SamplingParams) -> Collector:
    collector = Collector(params.n)
    engine.submit(EngineRequest(inputs["input_ids"], params, collector, inputs.get("pixel_values"),
                                inputs.get("pixel_attention_mask")))
    return collector


def test_greedy_tokens_equal_each_request_alone_as_requests_come_and_go(shipped: tuple[Any, Any]) -> None:
    model, processor = shipped
    images = [Image.open(p).convert("RGB") for p in sorted(EXAMPLES.glob("*.png"))]
    questions = ["What color is the circle?", "Describe the image.", "How many shapes are there?",
                 "Which image has more shapes?", "What shape is red?"]
    eos = [processor.end_of_utterance_id, processor.tokenizer.eos_token_id]
    requests = [chat_inputs(processor, questions[i % 5], images[i % 4: i % 4 + i % 3]) for i in range(9)]
    alone = [model.generate(**r, max_new_tokens=20, eos_token_id=eos)[0, r["input_ids"].shape[1]:].tolist()
             for r in requests]
    assert len({len(a) for a in alone}) > 1 and len({r["input_ids"].shape[1] for r in requests}) > 3
    engine = Engine(model, max_batch_size=3, max_model_len=1024)  # fewer slots than requests: some wait
    try:
        collectors = []
        for i, r in enumerate(requests):
            collectors.append(submit(engine, r, SamplingParams(20, eos)))
            time.sleep(0.02 * (i % 3))  # arrivals spread over the running steps
        for c in collectors:
            assert c.done.wait(60)
    finally:
        engine.close()
    assert [c.tokens[0] for c in collectors] == alone
    assert all(c.events[-1].finish_reason == ("stop" if a[-1] in eos else "length") for c, a in zip(collectors, alone))


@pytest.mark.parametrize("window", [5, None])
def test_sliding_window_and_random_weights_match_generate(window: int | None) -> None:
    """Prompts longer than the window on a random model (no early EOS): rows of different lengths
    in one step each see only their own window."""
    config = Idefics2Config.from_dict(tiny_config_dict(sliding_window=window))
    torch.manual_seed(0)
    model = Idefics2ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 90, (1, n), generator=g) for n in (3, 11, 7, 16)]
    alone = [model.generate(p, max_new_tokens=12, eos_token_id=[])[0, p.shape[1]:].tolist() for p in prompts]
    engine = Engine(model, max_batch_size=4, max_model_len=64)
    try:
        collectors = [submit(engine, {"input_ids": p}, SamplingParams(12, [])) for p in prompts]
        for c in collectors:
            assert c.done.wait(30)
    finally:
        engine.close()
    assert [c.tokens[0] for c in collectors] == alone


def test_sampling_with_a_seed_equals_generate_and_siblings_share_the_prefill(shipped: tuple[Any, Any]) -> None:
    model, processor = shipped
    image = Image.open(EXAMPLES / "shapes.png").convert("RGB")
    inputs = chat_inputs(processor, "Describe the image.", [image])
    T = inputs["input_ids"].shape[1]
    eos = [processor.end_of_utterance_id]
    expected = model.generate(**inputs, max_new_tokens=16, eos_token_id=eos, do_sample=True, temperature=1.3,
                              top_k=30, top_p=0.95, seed=7)[0, T:].tolist()
    engine = Engine(model, max_batch_size=6, max_model_len=1024)
    try:
        other = submit(engine, chat_inputs(processor, "What color is the circle?", [image]), SamplingParams(16, eos))
        params = SamplingParams(16, eos, temperature=1.3, top_k=30, top_p=0.95, seed=7)
        one = submit(engine, inputs, params)
        three = submit(engine, inputs, SamplingParams(16, eos, temperature=2.0, seed=11, n=4))
        greedy_two = submit(engine, inputs, SamplingParams(16, eos, n=2))
        for c in (other, one, three, greedy_two):
            assert c.done.wait(60)
    finally:
        engine.close()
    assert one.tokens[0] == expected  # unaffected by the requests decoding beside it
    assert len({tuple(t) for t in three.tokens}) > 1  # independent samples
    assert greedy_two.tokens[0] == greedy_two.tokens[1]


def test_logprobs_are_the_model_log_softmax(shipped: tuple[Any, Any]) -> None:
    model, processor = shipped
    inputs = chat_inputs(processor, "Describe the image.", [Image.open(EXAMPLES / "shapes.png").convert("RGB")])
    out = model.generate(**inputs, max_new_tokens=5, eos_token_id=[], output_logits=True, return_dict_in_generate=True)
    engine = Engine(model, max_batch_size=2, max_model_len=1024)
    try:
        c = submit(engine, inputs, SamplingParams(5, [], logprobs=3))
        assert c.done.wait(30)
    finally:
        engine.close()
    for event, logits in zip(c.events, out.logits):
        reference = logits[0].log_softmax(-1)
        assert event.logprob == pytest.approx(float(reference[event.token]), abs=1e-5)
        assert [t for t, _ in event.top_logprobs] == reference.topk(3).indices.tolist()


def test_cancelled_requests_leave_at_the_next_step_and_free_their_slots() -> None:
    config = Idefics2Config.from_dict(tiny_config_dict())
    model = Idefics2ForConditionalGeneration(config).eval()
    engine = Engine(model, max_batch_size=2, max_model_len=512)
    try:
        first = queue.Queue()
        long_request = EngineRequest(torch.tensor([[1, 5, 6]]), SamplingParams(500, []), first.put)
        engine.submit(long_request)
        first.get(timeout=10)
        long_request.cancel()
        time.sleep(0.2)
        assert engine.num_running == 0 and engine.cache_usage == 0
        waiting = EngineRequest(torch.tensor([[1, 7]]), SamplingParams(500, []), lambda e: None)
        waiting.cancel()
        engine.submit(waiting)  # cancelled while queued: never admitted
        after = submit(engine, {"input_ids": torch.tensor([[1, 8]])}, SamplingParams(4, []))
        assert after.done.wait(10) and len(after.tokens[0]) == 4
    finally:
        engine.close()
    assert first.qsize() < 100  # decoding stopped long before 500 tokens


def test_failures_stay_with_their_request_and_limits_are_checked() -> None:
    config = Idefics2Config.from_dict(tiny_config_dict())
    model = Idefics2ForConditionalGeneration(config).eval()
    engine = Engine(model, max_batch_size=2, max_model_len=16)
    try:
        def broken() -> list[Any]:
            def rule(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                raise RuntimeError("rule failed")
            return [rule]

        bad = submit(engine, {"input_ids": torch.tensor([[1, 5]])}, SamplingParams(4, [], logits_processors=broken))
        good = submit(engine, {"input_ids": torch.tensor([[1, 5]])}, SamplingParams(4, []))
        assert bad.done.wait(10) and good.done.wait(10)
        assert bad.events[-1].finish_reason == "error" and "rule failed" in bad.events[-1].error
        assert len(good.tokens[0]) == 4
        with pytest.raises(ValueError, match="max_model_len 16"):
            engine.submit(EngineRequest(torch.ones(1, 10, dtype=torch.long), SamplingParams(7, []), print))
        with pytest.raises(ValueError, match="n must be"):
            engine.submit(EngineRequest(torch.ones(1, 2, dtype=torch.long), SamplingParams(2, [], n=3), print))
    finally:
        engine.close()
    stalled = Engine(model, max_batch_size=1, max_model_len=512, max_queue=1)
    try:
        stalled.submit(EngineRequest(torch.tensor([[1, 5]]), SamplingParams(400, []), lambda e: None))
        time.sleep(0.1)  # the first is running; the next waits, and the one after that is refused
        stalled.submit(EngineRequest(torch.tensor([[1, 5]]), SamplingParams(4, []), lambda e: None))
        with pytest.raises(QueueFull):
            stalled.submit(EngineRequest(torch.tensor([[1, 5]]), SamplingParams(4, []), lambda e: None))
    finally:
        stalled.close()
