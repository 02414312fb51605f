"""The HTTP baseline: Flask's hello world, served by bench/hello_gunicorn.conf.py."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    return "Hello, World!"
