"""`jetserve worker --quantization int8` serves the quantized model: over the bus, its
greedy tokens are the in-process quantized engine's."""

from __future__ import annotations

from engine_worker.engine.llm import LLM
from shared.sampling_params import SamplingParams
from tests.support.stack import BusClient, Stack, tokens_by_index

PROMPT = [1, 20, 31, 42, 53, 64, 75]


async def test_worker_serves_the_int8_model(bus_stack: Stack, bus: BusClient) -> None:
    bus_stack.start_worker("--quantization", "int8")
    job = bus.make_job(PROMPT, max_tokens=12, temperature=0.0, ignore_eos=True)
    await bus.submit(job)
    got = tokens_by_index(await bus.collect(job.id))[0]
    llm = LLM(str(bus_stack.model_dir), quantization="int8")
    assert llm.engine.runner.model.layers[0].mlp.down.method == "int8"
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert got == llm.generate([PROMPT], params)[0].outputs[0].token_ids
