/*
 * search.cgi - demo search API for cgipool.
 *
 *   GET /?q=test            -> {"query": "test", "results": [{"id": 1, "title": "Test Result"}], "pid": ..., "port": ...}
 *   GET /?q=x&delay_ms=500  -> the same, answered 500 ms later without blocking other connections
 *   GET /                   -> 400 {"error": "missing q parameter", ...}
 *
 * Usage: search.cgi PORT   (or $PORT)
 */
#include "../lib/httpd.h"

#include <stdio.h>
#include <string.h>

#define Q_MAX 1024

/* Strict decimal integer in [lo, hi]; returns 0 on success. */
static int parse_uint(const char *s, unsigned long lo, unsigned long hi, unsigned long *out)
{
    unsigned long v = 0;
    if (*s == '\0')
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > hi)
            return -1;
    }
    if (v < lo)
        return -1;
    *out = v;
    return 0;
}

static void handle(const struct httpd_request *req, struct httpd_response *res)
{
    char q[Q_MAX + 1], title[Q_MAX + 1], delay[32];

    ssize_t qlen = httpd_query_param(req->query, "q", q, sizeof q);
    if (qlen <= 0) {
        httpd_resp_error(res, 400, "missing q parameter");
        return;
    }
    if ((size_t)qlen > Q_MAX) {
        httpd_resp_error(res, 400, "q parameter too long (max %d bytes)", Q_MAX);
        return;
    }

    int has_delay = 0;
    unsigned long delay_ms = 0;
    ssize_t dlen = httpd_query_param(req->query, "delay_ms", delay, sizeof delay);
    if (dlen >= 0) {
        if ((size_t)dlen >= sizeof delay ||
            parse_uint(delay, 0, HTTPD_DELAY_MAX_MS, &delay_ms) != 0) {
            httpd_resp_error(res, 400, "delay_ms must be an integer between 0 and %d",
                             HTTPD_DELAY_MAX_MS);
            return;
        }
        has_delay = 1;
    }

    /* Title: the query with its first letter upper-cased, plus " Result". */
    size_t n = (size_t)qlen;
    memcpy(title, q, n);
    if (title[0] >= 'a' && title[0] <= 'z')
        title[0] = (char)(title[0] - 'a' + 'A');

    httpd_resp_append(res, "{\"query\": ");
    httpd_resp_json_stringn(res, q, n);
    httpd_resp_append(res, ", \"results\": [{\"id\": 1, \"title\": ");
    /* Escape "<title> Result" as one string. */
    char full[Q_MAX + 16];
    memcpy(full, title, n);
    memcpy(full + n, " Result", 7);
    httpd_resp_json_stringn(res, full, n + 7);
    httpd_resp_append(res, "}]");
    if (has_delay)
        httpd_resp_append(res, ", \"delay_ms\": %lu", delay_ms);
    httpd_resp_json_end(res);
    res->delay_ms = (unsigned)delay_ms;
}

int main(int argc, char **argv)
{
    return httpd_main("search", argc, argv, handle);
}
