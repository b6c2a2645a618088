"""The runners' book of requests by id: duplicates of a running request are refused, finished ones are kept up
to a bound (oldest first out), running ones always."""

from concurrent.futures import Future

import pytest

from kiln.engine.requests import RequestBook
from kiln.engine.errors import InvalidRequest, RequestAborted


class Handle:
    def __init__(self):
        self.future = Future()

    def fail(self, error):
        if not self.future.done():
            self.future.set_exception(error)

    def finish(self):
        self.future.set_result(None)
        return self


def test_a_running_id_is_refused_and_a_finished_one_can_be_reused():
    book = RequestBook()
    first = Handle()
    book.add("r1", first)
    with pytest.raises(InvalidRequest, match="r1.*already running"):
        book.add("r1", Handle())
    first.finish()
    second = Handle()
    book.add("r1", second)
    assert book.get("r1") is second


def test_finished_requests_are_kept_up_to_the_bound_and_running_ones_always():
    book = RequestBook(keep_finished=2)
    running = Handle()
    book.add("running", running)
    for name in ("a", "b", "c"):
        book.add(name, Handle().finish())
    assert book.get("running") is running  # the oldest, but still under way
    assert book.get("a") is None and book.get("b") is not None and book.get("c") is not None


def test_discard_forgets_only_the_given_handle_and_fail_all_fails_the_running():
    book = RequestBook()
    handle, done = Handle(), Handle().finish()
    book.add("r", handle)
    book.add("done", done)
    book.discard("r", Handle())
    assert book.get("r") is handle
    book.fail_all(RequestAborted("closing"))
    assert isinstance(handle.future.exception(), RequestAborted) and done.future.exception() is None
    book.discard("r", handle)
    assert book.get("r") is None
