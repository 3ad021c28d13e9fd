"""The design most "ChatGPT over SMS" apps use, as the peer Parley is measured against:
a Flask webhook that checks Twilio's signature, asks the model inside the request (openai
SDK) and sends the answer through the twilio SDK before it returns, served by gunicorn sync
workers. No database: the peer is given every advantage but the design.

    gunicorn -w $((2 * $(nproc) + 1)) -k sync -b 127.0.0.1:8001 bench.peer_inline.app:app

The worker count is gunicorn's documented rule of thumb, (2 x cores) + 1. Configuration is
the environment Parley reads: TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_API_BASE_URL,
OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL, PUBLIC_BASE_URL.
"""

from __future__ import annotations

import os

from flask import Flask, Response, abort, request
from openai import OpenAI
from twilio.request_validator import RequestValidator
from twilio.rest import Client

EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response/>'
SYSTEM_PROMPT = "You are a helpful assistant answering by SMS. Keep it short."

app = Flask(__name__)
validator = RequestValidator(os.environ["TWILIO_AUTH_TOKEN"])
model = OpenAI(api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ.get("OPENAI_BASE_URL"))
twilio = Client(os.environ["TWILIO_ACCOUNT_SID"], os.environ["TWILIO_AUTH_TOKEN"])
if os.environ.get("TWILIO_API_BASE_URL"):
    twilio.api.base_url = os.environ["TWILIO_API_BASE_URL"]
PUBLIC_BASE_URL = os.environ.get("PUBLIC_BASE_URL", "")


@app.post("/webhooks/twilio/sms")
def sms() -> Response:
    url = (PUBLIC_BASE_URL + request.path) if PUBLIC_BASE_URL else request.url
    if not validator.validate(url, request.form, request.headers.get("X-Twilio-Signature", "")):
        abort(403)
    completion = model.chat.completions.create(
        model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
        messages=[
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": request.form["Body"]},
        ],
    )
    twilio.messages.create(
        to=request.form["From"],
        from_=request.form["To"],
        body=completion.choices[0].message.content or "",
    )
    return Response(EMPTY_TWIML, mimetype="text/xml")
