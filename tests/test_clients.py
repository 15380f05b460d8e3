"""Real client libraries pointed at the endpoint as people point them at a local OpenAI-compatible
server: LangChain's ``ChatOpenAI`` (tool binding, structured output) and ``instructor`` (tool
mode and JSON-schema mode), each making a tool call and a JSON-schema answer against the
real server. The tiny model's words mean nothing; the shapes are what the endpoint vouches
for (the answer is grammar-constrained), so the shapes are what is checked."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import openai
import pytest
from conftest import free_port, tiny_settings
from pydantic import BaseModel, Field

from appliance.cli.init import create_home, export_base
from appliance.home.config import load
from appliance.serving.guard import read_api_key
from appliance.serving.server import Server


class Weather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


class Booking(BaseModel):
    """An appointment request."""

    day: Literal["mon", "tue", "wed"]
    urgent: bool
    note: str = Field(max_length=16)


ASK = "What is the weather in Paris this week?"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path):
    home = create_home(tmp_path_factory.mktemp("clients") / "home", "tiny", tiny_settings())
    shutil.copytree(tiny_base, home.base("tiny"))
    (home.base("tiny") / "meta.json").write_text("{}")
    settings = load(home.config)
    export_base(home, settings)
    server = Server(home, settings, port=free_port()).start()
    yield {"url": server.url + "/v1", "key": read_api_key(home)}
    server.stop()


def test_langchain_tool_call_and_structured_output(endpoint):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=endpoint["url"],
        api_key=endpoint["key"],
        model="appliance",
        temperature=0,
        max_tokens=250,
        max_retries=0,
        timeout=120,
    )
    message = llm.bind_tools([Weather], tool_choice="Weather").invoke(ASK)
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    weather = Weather(**message.tool_calls[0]["args"])  # arguments that validate against the tool's schema
    assert 1 <= weather.days <= 7
    streamed = list(llm.bind_tools([Weather], tool_choice="any").stream(ASK))
    whole = streamed[0]
    for chunk in streamed[1:]:
        whole += chunk
    assert whole.tool_calls and whole.tool_calls[0]["name"] == "Weather"
    booking = llm.with_structured_output(Booking, method="json_schema").invoke("Book me in, please.")
    assert isinstance(booking, Booking) and booking.day in ("mon", "tue", "wed")


def test_instructor_tools_and_json_schema_modes(endpoint):
    import instructor

    client = openai.OpenAI(base_url=endpoint["url"], api_key=endpoint["key"], max_retries=0, timeout=120)
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        patched = instructor.from_openai(client, mode=mode)
        weather = patched.chat.completions.create(
            model="appliance",
            response_model=Weather,
            max_retries=0,
            max_tokens=250,
            temperature=0,
            messages=[{"role": "user", "content": ASK}],
        )
        assert isinstance(weather, Weather) and len(weather.city) <= 12, mode
