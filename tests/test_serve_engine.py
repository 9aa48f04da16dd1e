"""The batching engine on its own (no HTTP): batched decoding equals one-at-a-time decoding,
rows are freed on finish/cancel/timeout, the queue pushes back, seeds reproduce."""
from __future__ import annotations

import asyncio

import pytest
import torch

from llmkit.io.checkpoint import load_checkpoint
from llmkit.errors import LlmkitError
from llmkit.infer.sampling import SamplingParams
from llmkit.infer.generate import generate
from llmkit.serve.engine import Engine, QueueFull
from llmkit.serve.prefill import Prefiller
from conftest import make_tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_checkpoint(make_tiny_model(tmp_path_factory.mktemp("tiny")))


async def collect(job) -> dict[int, tuple[str, int, str]]:
    """{index: (text, tokens, finish_reason)} once every sequence of the job has finished."""
    texts, tokens, finish = {}, {}, {}
    while len(finish) < job.size:
        ev = await asyncio.wait_for(job.events.get(), timeout=60)
        texts[ev.index] = texts.get(ev.index, "") + ev.text
        tokens[ev.index] = tokens.get(ev.index, 0) + ev.token
        if ev.finish:
            finish[ev.index] = ev.finish
    return {i: (texts.get(i, ""), tokens.get(i, 0), finish[i]) for i in finish}


def run(engine, coro):
    async def main():
        engine.start()
        try:
            return await coro()
        finally:
            engine.stop()
    return asyncio.run(main())


PROMPTS = ["The king", "Soldiers march home through rain to find their hearts older than the walls of",
           "Soldiers march home through rain to a garden", "A", "Love and war in a garden where roses grow",
           "the pale moon", "Queen speaks of the stone"]


def test_continuous_batching_matches_one_at_a_time(tiny):
    """Sequences joining and leaving a running batch (each row at its own length, rows moved into the
    holes others leave, a 64-slot context) produce exactly the greedy text of llmkit.infer.generate run on
    each prompt alone."""
    model, tok = tiny
    lengths = [20 + 2 * (i % 3) for i in range(len(PROMPTS))]
    expected = [generate(model, tok, p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, lengths)]
    engine = Engine(model, tok, max_batch=3, context=64)

    async def go():
        jobs = []
        for i, (prompt, n) in enumerate(zip(PROMPTS, lengths)):
            jobs.append(engine.submit([tok.encode(prompt)], SamplingParams(max_new_tokens=n, temperature=0)))
            await asyncio.sleep(0.01 * i)  # arrive while others are mid-decode
        return [await collect(job) for job in jobs]

    results = run(engine, go)
    for want, got, n in zip(expected, results, lengths):
        text, n_tokens, finish = got[0]
        assert text == want
        assert (finish, n_tokens) == ("length", n) or (finish == "stop" and n_tokens < n)
    assert engine.active_count == 0 and engine.queue_depth == 0
    assert engine.steps > 0
    assert engine._prefiller.reused_tokens >= 6  # "Soldiers march home through rain to" ran once


def test_prefill_batches_and_reuses_prefixes_exactly(tiny):
    """Batched, right-padded prefill with a shared prefix (computed once, later copied from the kept
    prompt) gives each prompt the logits and keys/values it gets when prefilled alone."""
    model, tok = tiny
    prefiller = Prefiller(model)
    batch = [tok.encode(t) for t in ("The king speaks of love", "The king speaks of war and roses",
                                     "The king speaks of the moon")]
    shared = 4  # "The king speaks of"
    assert all(p[:shared] == batch[0][:shared] for p in batch) and batch[0][shared] != batch[1][shared]
    rounds = [batch, batch, [batch[2] + tok.encode(" under a pale moon")], [tok.encode("Soldiers")]]
    with torch.inference_mode():
        for prompts in rounds:
            logits, sources = prefiller(prompts)
            for i, prompt in enumerate(prompts):
                alone = model.new_cache(1, len(prompt))
                want = model(torch.tensor([prompt]), cache=alone, last_only=True)[0][0, -1]
                assert torch.allclose(logits[i], want, atol=1e-4)
                got = model.new_cache(1, len(prompt))
                got.copy_row(0, *sources[i], len(prompt))
                for a, b in zip(got.k + got.v, alone.k + alone.v):
                    assert torch.allclose(a, b, atol=1e-4)
    # rounds 1 and 2: the prefix runs once for three rows (round 2 copies even that from the kept
    # prompt); round 3 continues the kept prompt; round 4 shares nothing
    assert prefiller.reused_tokens == 2 * shared + (shared + 2 * shared) + len(batch[2])


def test_choices_share_a_prefill_and_seeds_reproduce(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=4)
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234)

    async def go():
        a = await collect(engine.submit([tok.encode("The king")], params, n=3))
        b = await collect(engine.submit([tok.encode("The king")], params, n=3))
        return a, b

    a, b = run(engine, go)
    assert a == b  # same seed, same choices
    assert len({a[i][0] for i in range(3)}) > 1  # choice i draws with seed + i: they differ


def test_stop_string_ends_the_sequence(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2)
    prompt = tok.encode("the king")
    free = generate(model, tok, "the king", max_new_tokens=20, temperature=0)
    stop = free.strip()[3:5]  # two characters from inside the greedy continuation
    assert stop and stop in free

    async def go():
        return await collect(engine.submit([prompt], SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,))))

    text, _, finish = run(engine, go)[0]
    assert finish == "stop" and stop not in text and free.startswith(text)


def test_cancel_and_timeout_free_their_rows(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, max_queue=4, context=256, timeout=None)
    # ignore_eos: a sampled end-of-text would free a row early and admit the waiting request
    long = SamplingParams(max_new_tokens=200, temperature=1.0, ignore_eos=True)

    async def go():
        job = engine.submit([tok.encode("a")], long, n=2)
        waiting = engine.submit([tok.encode("b")], long)
        while engine.active_count < 2:
            await asyncio.sleep(0.01)
        assert engine.queue_depth == 1
        job.cancel()
        waiting.cancel()
        for _ in range(500):
            if engine.active_count == 0 and engine.queue_depth == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert run(engine, go)

    # a deadline that has passed before the engine looks: the sequence ends with a timeout event
    engine = Engine(model, tok, max_batch=1, timeout=1e-6)

    async def timed_out():
        job = engine.submit([tok.encode("a")], SamplingParams(max_new_tokens=50))
        return await asyncio.wait_for(job.events.get(), timeout=30)

    event = run(engine, timed_out)
    assert (event.finish, event.token) == ("timeout", False) and "timed out" in event.error
    assert engine.active_count == 0 and engine.queue_depth == 0


def test_queue_pushes_back(tiny):
    model, tok = tiny
    engine = Engine(model, tok, max_batch=1, max_queue=2)

    async def go():
        # engine not started: nothing leaves the queue
        engine.submit([tok.encode("a")], SamplingParams(max_new_tokens=4), n=2)
        with pytest.raises(QueueFull):
            engine.submit([tok.encode("b")], SamplingParams(max_new_tokens=4))
        with pytest.raises(LlmkitError):
            engine.submit([tok.encode("b")], SamplingParams(max_new_tokens=4), n=3)  # could never fit
        return True

    assert asyncio.run(go())


def test_engine_survives_a_failing_step(tiny, monkeypatch):
    """A broken forward pass (in a prefill, then in a decode step) fails the requests it was working
    on with an error event; the engine keeps serving the next ones."""
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2)
    real_forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] in (1, 4):  # the first request's prefill; the second one's second decode step
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    params = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)

    async def go():
        return [await collect(engine.submit([tok.encode("a")], params)) for _ in range(3)]

    first, second, third = run(engine, go)
    assert first[0] == ("", 0, "error")
    assert second[0][1:] == (2, "error")  # the prefill's token and one decode step got out
    assert third[0][1:] == (8, "length")
    assert engine.active_count == 0


def test_cache_grows_on_demand_and_is_released_when_idle(tiny, monkeypatch):
    import llmkit.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "INITIAL_SLOTS", 8)
    model, tok = tiny
    engine = Engine(model, tok, max_batch=2)
    sizes = []
    real_reserve = engine._reserve

    def reserve(slots):
        real_reserve(slots)
        sizes.append(engine.decoder.cache.max_len)

    engine._reserve = reserve

    async def go():
        return await collect(engine.submit([tok.encode("the king")],
                                           SamplingParams(max_new_tokens=30, ignore_eos=True)))

    assert run(engine, go)[0][1:] == (30, "length")
    assert sizes[0] == 8 and sizes[-1] >= 32 and sizes == sorted(sizes)  # doubled as the sequence grew
    assert engine.decoder is None  # nothing running: the grown cache is given back
