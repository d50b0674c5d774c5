"""A minimal OpenAI-compatible chat-completions client (standard library only): GPT-4o, Gemini's OpenAI endpoint,
vLLM and SGLang servers all speak it.

    payload = {"model": "gpt-4o", "messages": user_message(images, text), "temperature": 0.9, ...}
    reply, attempts = complete(base_url, api_key, payload, timeout_s=60, max_retries=5, backoff_s=1.0)
    text = reply_text(reply)

Images go inline as base64 data URLs in `image_url` content parts (images first, then the text, as the policy's
prompt has them). Retries (exponential backoff, `Retry-After` honoured, capped) follow openai-python: HTTP 408, 409,
429 and 5xx, timeouts and dropped connections; any other 4xx fails at once. A failure raises ChatAPIError.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import mimetypes
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

RETRY_STATUS = frozenset({408, 409, 429})
MAX_BACKOFF_S = 60.0


class ChatAPIError(RuntimeError):
  """A request that failed for good: `status` is the HTTP status (None for a timeout / connection error)."""

  def __init__(
      self, message: str, status: int | None = None, retryable: bool = False, retry_after: float | None = None
  ):
    super().__init__(message)
    self.status, self.retryable, self.retry_after = status, retryable, retry_after


# ---------------------------------------------------------------------------------------------- the request
def image_data_url(image: Any) -> str:
  """An HxWx3 uint8 array, a PIL image, PNG/JPEG bytes or a file path -> "data:<mime>;base64,..."."""
  if isinstance(image, str):
    mime = mimetypes.guess_type(image)[0] or "image/png"
    with open(image, "rb") as f:
      raw = f.read()
  elif isinstance(image, bytes):
    raw, mime = image, "image/png" if image[:4] == b"\x89PNG" else "image/jpeg"
  else:
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    raw, mime = buf.getvalue(), "image/png"
  return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def user_message(images: Sequence[Any], text: str) -> list[dict]:
  parts = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
  return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def public_url(url: str) -> str:
  """The URL without user info, query or fragment (nothing secret goes into provenance)."""
  u = urllib.parse.urlsplit(url)
  host = u.hostname or ""
  netloc = host + (f":{u.port}" if u.port else "")
  return urllib.parse.urlunsplit((u.scheme, netloc, u.path.rstrip("/"), "", ""))


# ---------------------------------------------------------------------------------------------- one attempt
def post_chat(base_url: str, api_key: str | None, payload: dict, timeout_s: float) -> dict:
  """One POST to {base_url}/chat/completions -> the decoded JSON reply; raises ChatAPIError (retryable or not)."""
  headers = {"Content-Type": "application/json"}
  if api_key:
    headers["Authorization"] = f"Bearer {api_key}"
  req = urllib.request.Request(
      base_url.rstrip("/") + "/chat/completions", data=json.dumps(payload).encode(), headers=headers, method="POST"
  )
  try:
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
      body = resp.read()
  except urllib.error.HTTPError as e:
    detail = e.read()[:300].decode("utf-8", "replace")
    raise ChatAPIError(
        f"HTTP {e.code}: {detail}",
        e.code,
        e.code in RETRY_STATUS or e.code >= 500,
        _retry_after(e.headers.get("Retry-After") if e.headers else None),
    ) from None
  except (TimeoutError, urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
    reason = getattr(e, "reason", e)
    kind = "timeout" if isinstance(reason, TimeoutError) else "connection error"
    raise ChatAPIError(f"{kind}: {reason!r} (timeout {timeout_s} s)", None, True) from None
  try:
    return json.loads(body)
  except json.JSONDecodeError:
    raise ChatAPIError(f"reply is not JSON: {body[:200]!r}", None, False) from None


def _retry_after(value: str | None) -> float | None:
  try:
    return min(float(value), MAX_BACKOFF_S) if value else None
  except ValueError:
    return None


# ---------------------------------------------------------------------------------------------- with retries
def complete(
    base_url: str,
    api_key: str | None,
    payload: dict,
    *,
    timeout_s: float,
    max_retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict, int]:
  """(reply, attempts): up to 1 + max_retries attempts, sleeping backoff_s * 2**i (x1..1.25 jitter, or the
  server's Retry-After) between them. The last error is raised when every attempt failed."""
  for attempt in range(max_retries + 1):
    try:
      reply = post_chat(base_url, api_key, payload, timeout_s)
      reply_text(reply)  # a reply without a message is not a success
      return reply, attempt + 1
    except ChatAPIError as e:
      if not e.retryable or attempt == max_retries:
        e.args = (f"{e.args[0]} (after {attempt + 1} attempt(s))",)
        raise
      sleep(
          e.retry_after
          if e.retry_after is not None
          else min(backoff_s * 2**attempt * (1 + 0.25 * random.random()), MAX_BACKOFF_S)
      )
  raise AssertionError("unreachable")


def reply_text(reply: dict) -> str:
  """choices[0].message.content (a string, or a list of text parts as some servers send)."""
  try:
    content = reply["choices"][0]["message"]["content"]
  except (KeyError, IndexError, TypeError):
    raise ChatAPIError(f"reply has no choices[0].message.content: {json.dumps(reply)[:200]}") from None
  if isinstance(content, list):
    content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
  if not isinstance(content, str):
    raise ChatAPIError(f"message content is {type(content).__name__}, not text")
  return content
