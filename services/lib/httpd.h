/*
 * httpd.h - a tiny single-threaded epoll HTTP/1.1 server for cgipool workers.
 *
 * One process serves many keep-alive connections at once: every socket is
 * non-blocking and one epoll loop multiplexes them.  A service provides a
 * handler that turns a parsed request into a JSON response; the library does
 * the rest (parsing, limits, keep-alive, pipelining, delayed responses,
 * idle timeouts, graceful exit on SIGTERM/SIGINT).
 *
 *   static void handle(const struct httpd_request *req, struct httpd_response *res)
 *   {
 *       char q[256];
 *       if (!httpd_query_get(req, "q", q, sizeof q)) {
 *           httpd_resp_error(res, 400, "missing q parameter");
 *           return;
 *       }
 *       httpd_resp_append(res, "{\"query\": ");
 *       httpd_resp_json_string(res, q);
 *       httpd_resp_json_end(res);          // adds "pid" and "port", closes '}'
 *   }
 *   int main(int argc, char **argv) { return httpd_main("search", argc, argv, handle); }
 *
 * The handler is only called for GET/HEAD/POST requests of the path "/"
 * (any query string); everything else is answered by the library.
 */
#ifndef CGIPOOL_HTTPD_H
#define CGIPOOL_HTTPD_H

#include <stddef.h>
#include <sys/types.h>

/* Limits. */
#define HTTPD_LINE_MAX      4096        /* request line; longer -> 414 */
#define HTTPD_HEAD_MAX      8192        /* request line + headers; longer -> 431 */
#define HTTPD_HEADERS_MAX   100         /* header fields; more -> 431 */
#define HTTPD_REQ_BODY_MAX  (1u << 20)  /* request body (Content-Length); larger -> 413 */
#define HTTPD_BODY_MAX      16384       /* response body built by a handler */
#define HTTPD_DELAY_MAX_MS  10000       /* upper bound for httpd_response.delay_ms */
#define HTTPD_MAX_CONNS     4096        /* simultaneous connections (less if RLIMIT_NOFILE is low) */
#ifndef HTTPD_IDLE_MS
#define HTTPD_IDLE_MS       60000       /* idle keep-alive connections are closed (-D for tests) */
#endif
#ifndef HTTPD_FD_RESERVE
#define HTTPD_FD_RESERVE    16          /* descriptors kept free besides connections (-D for tests) */
#endif

struct httpd_request {
    const char *method;     /* "GET", "HEAD" or "POST" */
    const char *target;     /* raw request target, e.g. "/?q=test" */
    const char *path;       /* target up to '?', always "/" for handlers */
    const char *query;      /* raw query string after '?', "" when none */
    const char *body;       /* POST body (not NUL-terminated), may be NULL */
    size_t body_len;
    int http_minor;         /* 0 for HTTP/1.0, 1 for HTTP/1.1 */
    int pid;                /* this worker's pid */
    int port;               /* this worker's listening port */
};

struct httpd_response {
    int status;             /* HTTP status code, default 200 */
    unsigned delay_ms;      /* send the response this much later (0..HTTPD_DELAY_MAX_MS) */
    size_t len;             /* bytes used in body */
    int overflow;           /* set when an append did not fit; the library then sends 500 */
    int pid, port;          /* copied from the request, for the JSON helpers */
    char body[HTTPD_BODY_MAX];
};

typedef void (*httpd_handler)(const struct httpd_request *req, struct httpd_response *res);

/*
 * Parse the port from argv[1] (fallback: $PORT), listen on 127.0.0.1 and
 * serve until SIGTERM or SIGINT.  Returns the process exit status (0 after a
 * signal, 1 on a startup error, 2 on a usage error).  `name` is used in the
 * startup line "NAME: listening on 127.0.0.1:PORT pid=PID" on stderr.
 */
int httpd_main(const char *name, int argc, char **argv, httpd_handler handler);

/*
 * Find query parameter `name` (first occurrence), URL-decode it (%XX, '+')
 * into out[outlen] (always NUL-terminated when outlen > 0).
 * httpd_query_param returns the full decoded length (snprintf-like: a value
 * >= outlen means it was truncated) or -1 when the parameter is absent.
 * A parameter without '=' has the value "".  Decoded %00 bytes are kept, so
 * strlen(out) can be shorter than the returned length.
 * httpd_query_get returns `out` when found (possibly truncated), else NULL.
 */
ssize_t httpd_query_param(const char *query, const char *name, char *out, size_t outlen);
const char *httpd_query_get(const struct httpd_request *req, const char *name,
                            char *out, size_t outlen);

/* Decode %XX and '+' of in[0..inlen) into out[outlen]; returns the full decoded length. */
size_t httpd_url_decode(const char *in, size_t inlen, char *out, size_t outlen);

/*
 * Escape in[0..inlen) as the *contents* of a JSON string (no quotes added):
 * '"' and '\\' are escaped, control characters become \n, \t, ... or \u00XX,
 * invalid UTF-8 bytes become \ufffd.  Writes at most outlen-1 bytes plus a NUL
 * and never splits an escape; returns the full escaped length (snprintf-like).
 */
size_t httpd_json_escape(const char *in, size_t inlen, char *out, size_t outlen);

/* Response building; all bounded, overflow sets res->overflow. */
void httpd_resp_append(struct httpd_response *res, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Append a quoted, escaped JSON string. */
void httpd_resp_json_string(struct httpd_response *res, const char *s);
void httpd_resp_json_stringn(struct httpd_response *res, const char *s, size_t n);
/* Append `, "pid": N, "port": P}` -- closes the object the handler opened
 * (the handler writes "{" and at least one field, without a trailing comma). */
void httpd_resp_json_end(struct httpd_response *res);
/* Replace the body by {"error": "<msg>", "pid": N, "port": P} with `status`. */
void httpd_resp_error(struct httpd_response *res, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
