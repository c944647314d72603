"""Python functions as tools: schemas from type hints and docstrings, arguments converted before the call."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from typing import Literal, Optional

import pytest
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

pydantic = pytest.importorskip("pydantic")
pytest.importorskip("docstring_parser")

from toolgrad_edge.assistant import function_tool, tool  # noqa: E402
from toolgrad_edge.assistant.functions import result_text  # noqa: E402
from toolgrad_edge.errors import ToolSourceError  # noqa: E402
from toolgrad_edge.grammars import build_grammar, load_tools, parse_calls  # noqa: E402


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(pydantic.BaseModel):
    city: str
    country: str = "FR"


class Window(TypedDict):
    start: int
    end: int


@dataclasses.dataclass
class Point:
    x: float
    y: float


@tool(read_only=True)
def forecast(place: Place, day: datetime.date, unit: Unit = Unit.CELSIUS, hours: Optional[list[int]] = None,
             mode: Literal["brief", "full"] = "brief") -> dict:
    """Weather forecast for a place.

    Longer text about the forecast.

    Args:
        place: Where.
        day: Which day.
        unit: Temperature unit.
        hours: Hours of the day to include.
        mode: How much detail.
    """
    return {"place": place, "day": day, "unit": unit, "hours": hours, "mode": mode}


def numpy_style(window: Window, where: Point, tags: dict[str, str]) -> str:
    """Move a window.

    Parameters
    ----------
    window : Window
        The window to move.
    where : Point
        The target point.
    tags : dict
        Labels.
    """
    return f"{window['start']}-{window['end']} to {where.x},{where.y} {sorted(tags)}"


def rest_style(count: int, label: str = "x") -> str:
    """Repeat a label.

    :param count: How many times.
    :param label: The label.
    """
    return label * count


async def async_add(a: int, b: int) -> int:
    """Add two numbers.

    Args:
        a: First.
        b: Second.
    """
    return a + b


def test_schema_from_hints_and_google_docstring():
    ft = function_tool(forecast)
    assert ft.name == "forecast" and ft.read_only and not ft.is_async
    assert ft.description == "Weather forecast for a place.\n\nLonger text about the forecast."
    props = ft.parameters["properties"]
    assert ft.parameters["required"] == ["place", "day"]
    assert props["day"] == {"description": "Which day.", "format": "date", "type": "string"}
    assert props["mode"]["enum"] == ["brief", "full"] and props["mode"]["default"] == "brief"
    assert props["place"]["description"] == "Where." and "$ref" in str(props["place"])
    assert "Unit" in ft.parameters["$defs"] and ft.parameters["$defs"]["Unit"]["enum"] == ["celsius", "fahrenheit"]
    assert props["hours"]["anyOf"] == [{"items": {"type": "integer"}, "type": "array"}, {"type": "null"}]
    # The schema loads as a tool and compiles to a grammar.
    (loaded,) = load_tools([ft.spec])
    assert "root" in build_grammar([loaded], tool_choice="required")


def test_numpy_and_rest_docstrings_and_container_types():
    ft = function_tool(numpy_style)
    props = ft.parameters["properties"]
    assert props["window"]["description"] == "The window to move."
    assert props["tags"]["additionalProperties"] == {"type": "string"}
    assert set(ft.parameters["$defs"]) == {"Window", "Point"}
    assert not ft.read_only
    rest = function_tool(rest_style)
    assert rest.parameters["properties"]["count"] == {"description": "How many times.", "type": "integer"}
    assert rest.description == "Repeat a label."


def test_arguments_are_converted_to_the_annotated_types():
    ft = function_tool(forecast)
    kwargs = ft.validate({"place": {"city": "Paris"}, "day": "2026-11-30", "unit": "fahrenheit", "mode": "full"})
    assert kwargs["place"] == Place(city="Paris", country="FR")
    assert kwargs["day"] == datetime.date(2026, 11, 30)
    assert kwargs["unit"] is Unit.FAHRENHEIT and kwargs["hours"] is None
    kwargs = function_tool(numpy_style).validate({"window": {"start": 1, "end": 2}, "where": {"x": 1, "y": 2},
                                                  "tags": {"a": "b"}})
    assert kwargs["where"] == Point(1.0, 2.0)
    assert numpy_style(**kwargs) == "1-2 to 1.0,2.0 ['a']"


def test_invalid_arguments_say_which_one():
    with pytest.raises(ValueError, match=r"invalid arguments for forecast: day: .*date"):
        function_tool(forecast).validate({"place": {"city": "Paris"}, "day": "tomorrow"})
    with pytest.raises(ValueError, match="unit"):
        function_tool(forecast).validate({"place": {"city": "P"}, "day": "2026-01-01", "unit": "kelvin"})


def test_async_functions_and_options():
    ft = function_tool(async_add)
    assert ft.is_async and ft.parameters["required"] == ["a", "b"]

    @tool(name="renamed", description="Custom text.")
    def f(x: int) -> int:
        return x

    spec = function_tool(f).spec
    assert spec["name"] == "renamed" and spec["description"] == "Custom text."
    assert f(3) == 3  # @tool returns the function itself


def test_a_function_without_hints_takes_any_value():
    def loose(value, flag=False):
        """Anything."""
        return value

    props = function_tool(loose).parameters["properties"]
    assert props["flag"] == {"default": False}
    assert props["value"] == {}


def test_unusable_functions_are_refused_with_the_reason():
    def star(*args: int) -> int:
        return 0

    with pytest.raises(ToolSourceError, match=r"Python tool 'star'.*\*args"):
        function_tool(star)
    with pytest.raises(ToolSourceError, match="expected a Python function"):
        function_tool(42)


def test_result_text():
    assert result_text("plain") == "plain"
    assert result_text(None) == "null"
    assert result_text({"day": datetime.date(2026, 1, 2), "unit": Unit.CELSIUS, "p": Place(city="X")}) == \
        '{"day": "2026-01-02", "unit": "celsius", "p": {"city": "X", "country": "FR"}}'


def test_calls_parse_against_the_function_schema():
    (loaded,) = load_tools([function_tool(forecast).spec])
    calls = parse_calls('[forecast(place={"city": "Rome"}, day="2026-05-01", unit="celsius")]', [loaded])
    assert calls[0].arguments["place"] == {"city": "Rome"}
