"""The hub's two WebSockets: the UIs' state stream and the agents' link.

An agent authenticates with its host's token and can only ever speak as that host: the host name
comes from the token, never from what the agent says. Every frame of an agent's that the hub refuses
is answered with `error` naming the field before the connection closes, whatever was wrong with it
(its JSON, its shape, its size), and nothing it carried is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import weakref
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from hub import strictjson
from hub.access import GENERATION, Caller, agent, caller
from hub.credentials import CREDENTIALS
from hub.errors import HubError, RoleRefused
from hub.fleet import AgentLink, Fleet
from hub.live_output import FRAME_BURST, FRAMES_PER_SECOND, LINES_PER_SECOND, OutputGate
from hub.protocol import (
    MAX_MESSAGE_BYTES,
    ActionStatus,
    CommandStatus,
    ComplianceReport,
    OutputLines,
    ProtocolError,
    UpdateStatus,
    decode,
    parse_agent_message,
)
from hub.roles import Role

log = logging.getLogger("rastos-hub")

UI_MESSAGE_BYTES = 4096  # a UI only ever sends {"type": ACTION}
# What a UI may send on its stream, and the role each needs: only asking for the whole state again.
UI_ACTIONS: Mapping[str, Role] = MappingProxyType({"get_state": Role.viewer})
UNDERSTOOD = f"only {' or '.join(json.dumps({'type': action}) for action in UI_ACTIONS)} is understood".encode()
HEARTBEAT = 20.0  # WebSocket pings: a peer that vanished is noticed within two of them
FLEET = web.AppKey("fleet", Fleet)
SOCKETS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("sockets")


LINGER = 0.5  # seconds the rest of an oversized frame may take to arrive (and be discarded)


class _AgentSocket(web.WebSocketResponse):
    """aiohttp closes a socket itself when a frame is over the size limit (1009): the agent is told
    why first, in an `error` frame, as for any other refused frame. The rest of that frame is still on
    its way: closing before it has arrived would reset the connection, and the agent could lose the
    error unread, so the close waits a moment while it is read and thrown away."""

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code == WSCloseCode.MESSAGE_TOO_BIG and not self.closed:
            text = f"message: larger than the {MAX_MESSAGE_BYTES} bytes a frame may carry"
            log.warning("an agent sent a frame over %d bytes", MAX_MESSAGE_BYTES)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send_str(strictjson.dumps({"type": "error", "message": text}))
                await asyncio.sleep(LINGER)
            message = message or text.encode()[:120]
        return await super().close(code=code, message=message, drain=drain)


async def ui_stream(request: web.Request) -> web.StreamResponse:
    fleet, watch, who = request.app[FLEET], request.app[CREDENTIALS], caller(request)
    socket = web.WebSocketResponse(heartbeat=HEARTBEAT, max_msg_size=UI_MESSAGE_BYTES)
    await socket.prepare(request)
    watch.add(socket, who.credential, request[GENERATION])
    try:
        return await _follow(request, fleet, socket, who)
    finally:
        watch.discard(socket)


async def _follow(request: web.Request, fleet: Fleet, socket: web.WebSocketResponse, who: Caller) -> web.StreamResponse:
    request.app[SOCKETS].add(socket)
    queue = fleet.subscribe()
    # Everything a UI is sent goes through its queue, in order; an init is made when it is sent,
    # so the deltas queued before it are older than it and the UI skips them by version.
    queue.put_nowait({"type": "init_needed"})
    sender = asyncio.create_task(_forward(fleet, queue, socket))
    try:
        async for message in socket:
            if message.type != WSMsgType.TEXT:
                continue
            try:
                action = ui_action(message.data, who)
            except RoleRefused as error:  # the stream goes on, as the REST API's 403 leaves a client
                queue.put_nowait({"type": "error", **error.document()})
                continue
            if action is None:
                await socket.close(code=1008, message=UNDERSTOOD)
            elif action == "get_state":
                queue.put_nowait({"type": "init_needed"})
    finally:
        fleet.unsubscribe(queue)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    return socket


def ui_action(data: str, who: Caller, actions: Mapping[str, Role] = UI_ACTIONS) -> str | None:
    """The action a UI's message asks for ({"type": ACTION}), checked against the caller's role here
    for every action; None for a message that is not one."""
    try:
        message = json.loads(data)
    except ValueError:
        return None
    if not isinstance(message, dict) or set(message) != {"type"} or message["type"] not in actions:
        return None
    action: str = message["type"]
    if not who.role.allows(actions[action]):
        raise RoleRefused(f"the stream's {action}", actions[action].value, who.name, who.role.value)
    return action


async def _forward(fleet: Fleet, queue: asyncio.Queue[dict[str, Any]], socket: web.WebSocketResponse) -> None:
    while True:
        message = await queue.get()
        if message["type"] == "init_needed":
            message = fleet.init_message()
        try:
            await socket.send_str(strictjson.dumps(message))
        except ConnectionError:
            return


async def agent_socket(request: web.Request) -> web.StreamResponse:
    fleet, watch, by = request.app[FLEET], request.app[CREDENTIALS], agent(request)
    assert by is not None, "the route lets only hosts in"
    socket = _AgentSocket(heartbeat=HEARTBEAT, max_msg_size=MAX_MESSAGE_BYTES)
    await socket.prepare(request)
    watch.add(socket, by.credential, request[GENERATION])
    try:
        return await _serve_agent(request, fleet, by.host, socket)
    finally:
        watch.discard(socket)


async def _serve_agent(request: web.Request, fleet: Fleet, host: str, socket: _AgentSocket) -> web.StreamResponse:
    request.app[SOCKETS].add(socket)
    link = AgentLink(host, lambda message: socket.send_str(strictjson.dumps(message)), socket.close)
    gate = OutputGate()
    try:
        await link.send(await fleet.agent_connected(link))
        await fleet.agent_ready(link)
        async for message in socket:
            if message.type == WSMsgType.BINARY:
                await _refuse(socket, host, "message: must be a text frame (JSON), not binary")
                break
            if message.type != WSMsgType.TEXT:
                break  # errors (an oversized frame: see _AgentSocket) and closes end the connection
            if not await _agent_message(fleet, host, socket, message.data, gate):
                break
    finally:
        await fleet.agent_disconnected(link)
    return socket


async def _refuse(socket: web.WebSocketResponse, host: str, text: str) -> None:
    log.warning("agent %s sent a bad message: %s", host, text)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await socket.send_str(strictjson.dumps({"type": "error", "message": text}))
        await socket.close(code=1008, message=text.encode()[:120])


async def _output(fleet: Fleet, host: str, socket: web.WebSocketResponse, body: OutputLines, gate: OutputGate) -> bool:
    """Step output, within the connection's pace: lines over it are dropped (and logged), frames over
    it end the connection."""
    allowed = gate.take(len(body.lines))
    if allowed is None:
        await _refuse(socket, host, f"output: more than {FRAMES_PER_SECOND:.0f} frames a second (bursts of "
                                    f"{FRAME_BURST:.0f}); the hub closes this connection")  # fmt: skip
        return False
    if dropped := gate.report():
        log.warning("agent %s sends output faster than %.0f lines a second: %d lines dropped, not relayed",
                    host, LINES_PER_SECOND, dropped)  # fmt: skip
    if not fleet.output(host, body, allowed) and not gate.stray:
        gate.stray = True  # said once a connection: a late frame after a cancel is no news, a stream of them none
        log.info("agent %s sent output of command %s, which is not one of its own in flight: dropped", host,
                 body.command[:64])  # fmt: skip
    return True


async def _agent_message(fleet: Fleet, host: str, socket: web.WebSocketResponse, data: str, gate: OutputGate) -> bool:
    """Handle one agent message; False (after telling the agent why) ends the connection."""
    try:
        kind, body = parse_agent_message(decode(data))
    except ProtocolError as error:
        await _refuse(socket, host, error.message)
        return False
    if host not in fleet.hosts:
        await socket.close(code=1008, message=b"this host was removed from the hub")
        return False
    try:
        if kind == "facts":
            assert isinstance(body, dict)
            await fleet.facts(host, body)
        elif kind == "events":
            assert isinstance(body, list)
            await socket.send_str(strictjson.dumps({"type": "ack", "last_event": await fleet.agent_events(host, body)}))
        elif kind == "update_status":
            assert isinstance(body, UpdateStatus)
            await fleet.update_status(host, body)
        elif kind == "action_status":
            assert isinstance(body, ActionStatus)
            await fleet.action_status(host, body)
        elif kind == "compliance":
            assert isinstance(body, ComplianceReport)
            await fleet.compliance(host, body)
        elif kind == "output":
            assert isinstance(body, OutputLines)
            return await _output(fleet, host, socket, body, gate)
        else:
            assert isinstance(body, CommandStatus)
            await fleet.command_status(host, body)
    except HubError as error:
        await _refuse(socket, host, error.message)
        return False
    except (ConnectionError, RuntimeError):
        return False  # the agent went away meanwhile
    except Exception as error:  # the store failed (a database away): this agent tries again later
        log.error("the %s of %s could not be stored: %s", kind, host, error)
        await _refuse(socket, host, f"{kind}: could not be stored now ({type(error).__name__}); send again later")
        return False
    return True
