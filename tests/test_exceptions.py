"""The exception hierarchy of wsbroadcast.exceptions, as its documentation draws it: callers
catch by these bases, so a change of base is a breaking change this test makes visible."""

from __future__ import annotations

import re

import pytest

import wsbroadcast
from wsbroadcast import exceptions
from wsbroadcast.client import ClientClosed, NotConnected

HIERARCHY: dict[type[BaseException], tuple[type[BaseException], ...]] = {
    exceptions.WSBroadcastError: (Exception,),
    exceptions.InvalidInput: (exceptions.WSBroadcastError, ValueError),
    exceptions.InvalidName: (exceptions.InvalidInput,),
    exceptions.InvalidData: (exceptions.InvalidInput,),
    exceptions.InvalidBackendURL: (exceptions.InvalidInput,),
    exceptions.InvalidBackendOptions: (exceptions.InvalidBackendURL,),
    exceptions.AlreadyJoined: (exceptions.InvalidInput,),
    exceptions.NotJoined: (exceptions.InvalidInput,),
    exceptions.Forbidden: (exceptions.InvalidInput,),
    exceptions.ManagerNotRunning: (exceptions.WSBroadcastError, RuntimeError),
    exceptions.BackendError: (exceptions.WSBroadcastError,),
    exceptions.BackendUnavailable: (exceptions.BackendError,),
    NotConnected: (exceptions.WSBroadcastError, ConnectionError),
    ClientClosed: (exceptions.WSBroadcastError, ConnectionError),
}


@pytest.mark.parametrize(
    ("error", "bases"), HIERARCHY.items(), ids=lambda v: getattr(v, "__name__", "")
)
def test_each_exception_has_its_documented_bases(
    error: type[BaseException], bases: tuple[type[BaseException], ...]
) -> None:
    assert error.__bases__ == bases


def test_the_module_exports_every_exception_and_the_drawing_names_each() -> None:
    defined = {
        name
        for name, value in vars(exceptions).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert set(exceptions.__all__) == defined
    drawing = exceptions.__doc__ or ""
    for name in defined:
        assert re.search(rf"\b{name}\b", drawing), f"{name} is missing from the drawing"
        assert getattr(wsbroadcast, name) is getattr(exceptions, name)


def test_invalid_name_says_which_field_was_refused() -> None:
    with pytest.raises(exceptions.InvalidName) as caught:
        wsbroadcast.check_name("room", "a b")
    assert caught.value.field == "room"
