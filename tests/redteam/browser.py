"""A reviewer at a browser: Django's test client logged in as a demo user, reading pages and
submitting their forms as a browser would (every field the page holds, the button pressed), so
what a reviewer was shown is what the product really rendered."""

from dataclasses import dataclass, field
from html.parser import HTMLParser

from django.contrib.auth import get_user_model
from django.test import Client


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (name, value)

    def value(self, name: str) -> str | None:
        return next((v for n, v in self.fields if n == name), None)


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self._form: Form | None = None
        self._textarea: str | None = None
        self._select: str | None = None
        self._text = ""

    def handle_starttag(self, tag, attrs):
        a = {k: v if v is not None else "" for k, v in attrs}
        if tag == "form":
            self._form = Form(a.get("action", ""), a.get("method", "get").lower())
            self.forms.append(self._form)
        if self._form is None:
            return
        if tag == "input" and a.get("name"):
            kind = a.get("type", "text").lower()
            if kind in {"checkbox", "radio"} and "checked" not in a:
                return
            if kind in {"submit", "button", "image"}:
                self._form.buttons.append((a["name"], a.get("value", "")))
                return
            self._form.fields.append((a["name"], a.get("value", "")))
        elif tag == "button" and a.get("type", "submit") == "submit":
            self._form.buttons.append((a.get("name", ""), a.get("value", "")))
        elif tag == "textarea" and a.get("name"):
            self._textarea, self._text = a["name"], ""
        elif tag == "select" and a.get("name"):
            self._select = a["name"]
        elif tag == "option" and self._select and "selected" in a:
            self._form.fields.append((self._select, a.get("value", "")))

    def handle_data(self, data):
        if self._textarea is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "form":
            self._form = None
        elif tag == "textarea" and self._textarea is not None and self._form is not None:
            self._form.fields.append((self._textarea, self._text))
            self._textarea = None
        elif tag == "select":
            self._select = None


@dataclass
class Page:
    status: int
    html: str
    forms: list[Form]

    def form(self, action_part: str, **hidden: str) -> Form | None:
        """The first POST form whose action contains ``action_part`` and whose fields hold
        ``hidden`` (e.g. ``verdict="approve"``)."""
        for form in self.forms:
            if form.method != "post" or action_part not in form.action:
                continue
            if all(form.value(k) == v for k, v in hidden.items()):
                return form
        return None


class Browser:
    def __init__(self, username: str) -> None:
        self.user = get_user_model().objects.get(username=username)
        self.client = Client()
        self.client.force_login(self.user)

    def _page(self, response) -> Page:
        html = response.content.decode("utf-8", "replace")
        parser = _Forms()
        parser.feed(html)
        return Page(response.status_code, html, parser.forms)

    def get(self, url: str) -> Page:
        return self._page(self.client.get(url))

    def submit(self, form: Form, *, button: tuple[str, str] | None = None, **values: str) -> Page:
        """Submit ``form`` with its fields, ``values`` replacing same-named ones, and the
        pressed ``button`` (name, value) if it has a name."""
        data: dict[str, list[str]] = {}
        for name, value in form.fields:
            if name in values:
                continue
            data.setdefault(name, []).append(value)
        for name, value in values.items():
            data[name] = [value]
        if button and button[0]:
            data[button[0]] = [button[1]]
        return self._page(self.client.post(form.action, data))

    def post(self, url: str, data: dict[str, str]) -> Page:
        """What an attacker can do without the page: post straight to a URL."""
        return self._page(self.client.post(url, data))
