"""FastAPI dependencies as typed aliases; routes declare what they need with these."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, cast

from fastapi import Depends, Request
from sqlmodel import Session

from cloud_controller.bridge import Bridge
from cloud_controller.runtime import Runtime
from cloud_controller.settings import CloudSettings


def get_runtime(request: Request) -> Runtime:
    return cast(Runtime, request.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> CloudSettings:
    return runtime.settings


def get_bridge(runtime: RuntimeDep) -> Bridge:
    return runtime.bridge


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with Session(runtime.engine) as session:
        yield session


SettingsDep = Annotated[CloudSettings, Depends(get_settings)]
BridgeDep = Annotated[Bridge, Depends(get_bridge)]
SessionDep = Annotated[Session, Depends(get_session)]
