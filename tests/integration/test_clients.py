"""The client libraries people point at an OpenAI-compatible server, each used as
its users write it, against the shared gateway (the default model, no tool
parser: forced tool calls and structured outputs are what these libraries use to
get typed answers from any model).

LangChain's OpenAI and Anthropic chat models (invoke, stream, batch, tools,
structured output), the OpenAI Agents SDK on Responses and on chat with a
function tool, instructor's tools mode and pydantic-ai's structured output; and
a short run of vLLM's benchmark tool, guidellm."""

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from support import MODEL

QUESTION = "What is the capital of France?"


class City(BaseModel):
    """A city and its country."""

    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


# ---------------------------------------------------------------- LangChain


@pytest.fixture(scope="module")
def lc_openai(gateway_url):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=MODEL, base_url=gateway_url + "/v1", api_key="unused", temperature=0, max_tokens=40,
                      max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lc_anthropic(gateway_url):
    from langchain_anthropic import ChatAnthropic

    return ChatAnthropic(model=MODEL, base_url=gateway_url, api_key="unused", temperature=0, max_tokens=40,
                         max_retries=0, timeout=120)


@pytest.mark.parametrize("model", ["lc_openai", "lc_anthropic"])
def test_langchain_invoke_stream_batch(model, request):
    llm = request.getfixturevalue(model)
    whole = llm.invoke(QUESTION)
    assert "Paris" in whole.text and whole.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.text for chunk in llm.stream(QUESTION)) == whole.text
    answers = llm.batch([QUESTION, "Say hello."])
    assert answers[0].text == whole.text and answers[1].text


@pytest.mark.parametrize("model", ["lc_openai", "lc_anthropic"])
def test_langchain_tools(model, request):
    llm = request.getfixturevalue(model).bind_tools([get_weather], tool_choice="get_weather")
    msg = llm.invoke("What is the weather in Paris?")
    [call] = msg.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"} and isinstance(call["args"]["city"], str)


@pytest.mark.parametrize("model", ["lc_openai", "lc_anthropic"])
def test_langchain_structured_output(model, request):
    city = request.getfixturevalue(model).with_structured_output(City).invoke(QUESTION)
    assert isinstance(city, City) and city.city


# ---------------------------------------------------------------- OpenAI Agents SDK


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_agents_sdk_function_tool(gateway_url, api):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, Runner, function_tool
    from agents import set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # no export to OpenAI's tracing service
    client = AsyncOpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    model_cls = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    calls = []

    @function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = Agent(name="forecaster", instructions="Answer with the weather tool.", tools=[weather],
                  model=model_cls(model=MODEL, openai_client=client),
                  model_settings=ModelSettings(tool_choice="weather", temperature=0, max_tokens=60),
                  tool_use_behavior="stop_on_first_tool")
    result = asyncio.run(Runner.run(agent, "What is the weather in Paris?"))
    assert len(calls) == 1 and isinstance(calls[0], str)
    assert result.final_output == f"sunny in {calls[0]}"


# ---------------------------------------------------------------- instructor, pydantic-ai


def test_instructor_tools_mode(gateway_url):
    import instructor
    from openai import OpenAI

    client = instructor.from_openai(OpenAI(base_url=gateway_url + "/v1", api_key="unused", max_retries=0),
                                    mode=instructor.Mode.TOOLS)
    city = client.chat.completions.create(model=MODEL, response_model=City, max_retries=0, temperature=0,
                                          max_tokens=60, messages=[{"role": "user", "content": QUESTION}])
    assert isinstance(city, City) and city.city


def test_pydantic_ai_structured_output(gateway_url):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(base_url=gateway_url + "/v1", api_key="unused"))
    agent = Agent(model, output_type=City, retries=0, model_settings={"temperature": 0, "max_tokens": 60})
    result = agent.run_sync(QUESTION)
    assert isinstance(result.output, City) and result.output.city


# ---------------------------------------------------------------- guidellm


def test_guidellm_benchmark(gateway_url, tmp_path):
    """vLLM's benchmark tool, as its docs run it (synthetic prompts, the model's
    own tokenizer), for a short concurrent run: every request succeeds with the
    output length asked for."""
    from vllm_gateway.engine.default_model import ensure

    cli = Path(sys.executable).with_name("guidellm")
    proc = subprocess.run(
        [str(cli), "run", "--backend", f"kind=openai_http,target={gateway_url},model={MODEL}",
         "--profile", "kind=concurrent,streams=4", "--constraint", "kind=max_requests,count=8",
         "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
         "--tokenizer", f"kind=huggingface_auto,model={ensure(None)}", "--output", "kind=json",
         "--disable-console-interactive"],
        cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [bench] = json.loads((tmp_path / "benchmarks.json").read_text())["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert (totals["successful"], totals["errored"], totals["incomplete"]) == (8, 0, 0)
    assert bench["metrics"]["output_token_count"]["successful"]["total_sum"] == 8 * 16
