"""Console sessions: what a login (or a trusted listener) gives a browser.

A session is a random id in an ``HttpOnly``, ``SameSite=Strict`` cookie that expires, and a
second random value, the CSRF token, which every state-changing request must send back in a
header or form field: a page on another site can make the browser send the cookie (it
cannot here: SameSite=Strict) but never read the token. Sessions live in the agent's memory:
restarting the agent logs everyone out, which is the safe way round.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

COOKIE = "stoker_session"
#: a session ends this long after login, however busy it is
LIFETIME_S = 12 * 3600
#: and this long after its last request
IDLE_S = 2 * 3600
#: sessions kept at most (only the holders of the agent's token can create them on TCP);
#: the least recently used go first
MAX_SESSIONS = 1000


@dataclass
class Session:
    csrf: str
    created: float
    last_seen: float
    #: made just now: the response must set the cookie
    fresh: bool = False
    #: the cookie value, known only to the response that sets it
    cookie: str = ""

    def expires_in(self, now: float) -> float:
        return min(self.created + LIFETIME_S, self.last_seen + IDLE_S) - now


#: what a page rendered before any login is "signed in" as: no cookie, no CSRF token
ANONYMOUS = Session(csrf="", created=0.0, last_seen=0.0)


def _key(cookie: str) -> str:
    """Sessions are kept by a hash of their cookie, so the table holds no usable secret."""
    return hashlib.sha256(cookie.encode()).hexdigest()


class Sessions:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_key: OrderedDict[str, Session] = OrderedDict()

    def create(self) -> Session:
        """A new session; the answer carries its cookie (the table keeps only its hash)."""
        now = self.clock()
        cookie = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        self._by_key[_key(cookie)] = Session(csrf, created=now, last_seen=now)
        while len(self._by_key) > MAX_SESSIONS:
            self._by_key.popitem(last=False)
        return Session(csrf, created=now, last_seen=now, fresh=True, cookie=cookie)

    def get(self, cookie: str | None) -> Session | None:
        """The live session of this cookie (its idle time restarts), or None."""
        if not cookie:
            return None
        key = _key(cookie)
        session = self._by_key.get(key)
        if session is None:
            return None
        now = self.clock()
        if session.expires_in(now) <= 0:
            del self._by_key[key]
            return None
        session.last_seen = now
        self._by_key.move_to_end(key)
        return Session(session.csrf, session.created, now)

    def end(self, cookie: str | None) -> None:
        if cookie:
            self._by_key.pop(_key(cookie), None)

    def __len__(self) -> int:
        return len(self._by_key)


def csrf_matches(session: Session, given: str | None) -> bool:
    return given is not None and secrets.compare_digest(session.csrf.encode(), given.encode())
