"""A stub OpenAI-compatible chat-completions server on 127.0.0.1 for the client and study tests."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


KEY = "sk-test-not-a-real-key"

class Stub:
    """A chat-completions server: ``reply(body) -> text``; the first ``fail`` requests get ``fail_code``; after
    ``die_after`` replies it shuts itself down (later connections are refused). Stops by itself on exit."""

    def __init__(self, reply=None, fail=0, fail_code=429, die_after=None, raw=None, status=200):
        self.reply = reply or (lambda body: "Yes." if "Ibuprofen" in body["messages"][-1]["content"] else "No.")
        self.fail, self.fail_code, self.die_after, self.raw, self.status = fail, fail_code, die_after, raw, status
        self.requests, self.lock, self.served = [], threading.Lock(), 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    if stub.die_after is not None and stub.served >= stub.die_after:
                        self.close_connection = True      # dead: the connection drops without a reply
                        return
                    stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    failing = len(stub.requests) <= stub.fail
                if failing:
                    return self._send(stub.fail_code, {"error": {"message": "rate limited"}}, {"Retry-After": "0"})
                if stub.status != 200:
                    return self._send(stub.status, {"error": {"message": f"The model `{body['model']}` does not "
                                                                         f"exist"}})
                if stub.raw is not None:
                    return self._send(200, stub.raw)
                self._send(200, {"choices": [{"message": {"role": "assistant", "content": stub.reply(body)}}]})
                with stub.lock:
                    stub.served += 1
                    if stub.die_after is not None and stub.served >= stub.die_after:
                        threading.Thread(target=stub.stop, daemon=True).start()

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
                self.send_response(code)
                for k, v in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._stopped = False

    def stop(self):
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()
        self.thread.join(timeout=5)
