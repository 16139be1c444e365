"""Debian's firefox-esr driven over WebDriver BiDi, the protocol it speaks itself, for the hub UI's tests.

Playwright's own Firefox is a patched build, and its BiDi driver for a stock Firefox (channel
"moz-firefox") asks every new page for emulation.setMediaFeaturesOverride, which firefox-esr 153 does
not have: new_page fails. What the tests need is small (a tab, a page's script, real pointer and key
input, screenshots), so this client speaks the protocol itself over aiohttp's WebSocket client.
Synchronous like Playwright's API, it runs its connection on an event loop thread of its own."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import aiohttp

from tests.test_hub_ui import Background

FIREFOX = "/usr/bin/firefox-esr"
LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


class BidiError(Exception):
    """A command the browser answered with an error."""


class Connection:
    """One BiDi session: commands matched to their answers by id, a page's errors kept by tab."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket, self.last_id = socket, 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.page_errors: dict[str, list[str]] = {}
        self.messages: dict[str, list[str]] = {}
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        answer = self.pending[self.last_id] = asyncio.get_running_loop().create_future()
        await self.socket.send_json({"id": self.last_id, "method": method, "params": params})
        return await asyncio.wait_for(answer, 30)

    async def _read(self) -> None:
        async for message in self.socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            frame = json.loads(message.data)
            if frame.get("type") == "event":
                self._event(frame["method"], frame["params"])
            elif (answer := self.pending.pop(frame.get("id"), None)) is not None and not answer.done():
                if frame.get("type") == "error":
                    answer.set_exception(BidiError(f"{frame['error']}: {frame.get('message', '')}"))
                else:
                    answer.set_result(frame["result"])
        for answer in self.pending.values():
            if not answer.done():
                answer.set_exception(BidiError("the browser closed the connection"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method != "log.entryAdded" or params.get("type") != "javascript" or params.get("level") != "error":
            return
        # An uncaught exception (what Playwright reports as "pageerror") comes with its stack; Firefox's
        # own messages about the page's connections (a WebSocket refused or closed early) without one.
        kept = self.page_errors if "stackTrace" in params else self.messages
        kept.setdefault(params["source"]["context"], []).append(params.get("text", ""))


class Firefox:
    """A headless firefox-esr and its one BiDi session."""

    def __init__(self, process: subprocess.Popen[bytes], run: Background, connection: Connection) -> None:
        self.process, self.run, self.connection = process, run, connection

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self.run(self.connection.send(method, **params))

    def new_page(self, width: int, height: int) -> Page:
        page = Page(self, self.send("browsingContext.create", type="tab")["context"])
        page.set_viewport(width, height)
        return page


@contextmanager
def firefox(directory: Path) -> Iterator[Firefox]:
    """firefox-esr with a fresh profile in `directory`, its output kept in firefox.log there."""
    profile, log = directory / "profile", directory / "firefox.log"
    profile.mkdir(parents=True)
    # Port 0: Firefox picks a free port and says which on its output.
    argv = [FIREFOX, "--headless", "--remote-debugging-port=0", "--profile", str(profile), "--no-remote"]
    env = {**os.environ, "MOZ_CRASHREPORTER_DISABLE": "1"}
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=env)
    run = Background()
    session: aiohttp.ClientSession | None = None
    try:
        address = _listening(process, log)
        session = run(_session())
        connection = run(_connect(session, f"{address}/session"))
        browser = Firefox(process, run, connection)
        browser.send("session.new", capabilities={})
        browser.send("session.subscribe", events=["log.entryAdded"])
        yield browser
        # The browser may close the connection before it answers.
        with suppress(BidiError):
            browser.send("browser.close")
    finally:
        if session is not None:
            run(session.close())
        run.close()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()


async def _connect(session: aiohttp.ClientSession, address: str) -> Connection:
    return Connection(await session.ws_connect(address, max_msg_size=0))


def _listening(process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (match := LISTENING.search(log.read_text(errors="replace"))) is not None:
            return match.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"firefox-esr did not open its BiDi port:\n{log.read_text(errors='replace')[-3000:]}")


def installed() -> bool:
    return Path(FIREFOX).exists() or shutil.which("firefox-esr") is not None


def _local(value: str | int | bool) -> dict[str, Any]:
    """A Python value as a BiDi script argument."""
    if isinstance(value, bool):
        return {"type": "boolean", "value": value}
    if isinstance(value, int):
        return {"type": "number", "value": value}
    return {"type": "string", "value": value}


class Page:
    """One tab: script in the page, real pointer and key input, screenshots."""

    def __init__(self, browser: Firefox, context: str) -> None:
        self.browser, self.context = browser, context

    @property
    def errors(self) -> list[str]:
        """Exceptions the page's scripts did not catch."""
        return self.browser.connection.page_errors.get(self.context, [])

    @property
    def messages(self) -> list[str]:
        """Firefox's error messages about the page's connections."""
        return self.browser.connection.messages.get(self.context, [])

    def goto(self, url: str) -> None:
        self.browser.send("browsingContext.navigate", context=self.context, url=url, wait="complete")

    def set_viewport(self, width: int, height: int) -> None:
        self.browser.send("browsingContext.setViewport", context=self.context,
                          viewport={"width": width, "height": height})  # fmt: skip

    def _call(self, function: str, args: tuple[str | int | bool, ...]) -> dict[str, Any]:
        answer = self.browser.send(
            "script.callFunction", functionDeclaration=function, awaitPromise=True,
            target={"context": self.context}, arguments=[_local(arg) for arg in args], resultOwnership="none",
        )  # fmt: skip
        if answer["type"] == "exception":
            raise BidiError(f"{answer['exceptionDetails']['text']} in {function}")
        return dict(answer["result"])

    def evaluate(self, function: str, *args: str | int | bool) -> Any:
        """What `function` (JavaScript, called with `args`) returns, through JSON."""
        result = self._call(f"async (...args) => JSON.stringify(await ({function})(...args))", args)
        return None if result["type"] == "undefined" else json.loads(result["value"])

    def text(self, selector: str) -> str | None:
        return self.evaluate("(s) => document.querySelector(s)?.textContent ?? null", selector)  # type: ignore[no-any-return]

    def texts(self, selector: str) -> list[str]:
        return self.evaluate("(s) => [...document.querySelectorAll(s)].map((e) => e.textContent)", selector)  # type: ignore[no-any-return]

    def eventually(self, check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
        """`check()` once it is true, as Playwright's expect waits for the page to get there."""
        deadline = time.monotonic() + timeout
        while not (value := check()):
            if time.monotonic() > deadline:
                raise AssertionError(f"in Firefox, {what}: not after {timeout} s (last: {value!r})")
            time.sleep(0.05)
        return value

    def _element(self, selector: str, timeout: float = 10) -> dict[str, Any]:
        """The element once it is shown, scrolled into view: a pointer acts only where it can reach. Like
        Playwright's actions, this waits for it (a form the page shows a moment later, say)."""
        find = """(s) => { const e = document.querySelector(s);
                           if (!e?.checkVisibility()) return null;
                           e.scrollIntoView({block: "center"}); return e; }"""
        deadline = time.monotonic() + timeout
        while (found := self._call(find, (selector,)))["type"] != "node":
            if time.monotonic() > deadline:
                raise AssertionError(f"in Firefox, no element shown matches {selector} after {timeout} s")
            time.sleep(0.05)
        return {"type": "element", "element": {"sharedId": found["sharedId"]}}

    def click(self, selector: str) -> None:
        """A real click at the middle of the element, wherever the layout put it."""
        origin = self._element(selector)
        actions = [{"type": "pointerMove", "x": 0, "y": 0, "origin": origin},
                   {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]  # fmt: skip
        self.browser.send("input.performActions", context=self.context,
                          actions=[{"type": "pointer", "id": "mouse", "actions": actions}])  # fmt: skip

    def type(self, text: str) -> None:
        """Keys pressed one by one into whatever has the focus."""
        keys = [action for char in text for action in ({"type": "keyDown", "value": char},
                                                      {"type": "keyUp", "value": char})]  # fmt: skip
        self.browser.send("input.performActions", context=self.context,
                          actions=[{"type": "key", "id": "keyboard", "actions": keys}])  # fmt: skip

    def fill(self, selector: str, text: str) -> None:
        """A field emptied and then typed into, as a person would."""
        self.click(selector)
        self.evaluate("(s) => { const e = document.querySelector(s); e.select(); }", selector)
        self.type("\ue017")  # Delete: what was selected goes, with the input event a page listens for
        self.type(text)

    def select(self, selector: str, value: str) -> None:
        """A choice in a <select>, with the events a choice made by hand fires."""
        self.evaluate(
            """(s, v) => { const e = document.querySelector(s);
                           if (![...e.options].some((o) => o.value === v)) throw new Error(`no option ${v}`);
                           e.value = v; e.dispatchEvent(new Event("input", {bubbles: true}));
                           e.dispatchEvent(new Event("change", {bubbles: true})); }""",
            selector,
            value,
        )

    def screenshot(self, path: Path) -> None:
        """The whole document, not only what the window shows."""
        data = self.browser.send("browsingContext.captureScreenshot", context=self.context, origin="document")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.browser.send("browsingContext.close", context=self.context)
