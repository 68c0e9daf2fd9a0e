/*
 * calculator.cgi - demo calculator API for cgipool.
 *
 *   GET /?op=add&a=10&b=5  -> {"op": "add", "a": 10, "b": 5, "result": 15, "pid": ..., "port": ...}
 *   ops: add, subtract, multiply, divide.  Numbers are doubles printed with %.15g;
 *   NaN/infinite inputs or results, division by zero and unknown ops are 400s.
 *
 * Usage: calculator.cgi PORT   (or $PORT)
 */
#include "../lib/httpd.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define OP_MAX  256
#define NUM_MAX 128

/* Parse a finite decimal number occupying the whole string. */
static int parse_number(const char *s, size_t len, double *out)
{
    if (len == 0 || strlen(s) != len || isspace((unsigned char)s[0]))
        return -1;
    /* Decimal notation only: no hex floats, "inf" or "nan". */
    for (const char *p = s; *p; p++)
        if (!strchr("0123456789+-.eE", *p))
            return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end != '\0' || !isfinite(v) || (errno == ERANGE && fabs(v) > 1.0))
        return -1;
    *out = v;
    return 0;
}

static int get_number(const struct httpd_request *req, struct httpd_response *res,
                      const char *name, double *out)
{
    char buf[NUM_MAX + 1];
    ssize_t n = httpd_query_param(req->query, name, buf, sizeof buf);
    if (n <= 0) {
        httpd_resp_error(res, 400, "missing %s parameter", name);
        return -1;
    }
    if ((size_t)n > NUM_MAX || parse_number(buf, (size_t)n, out) != 0) {
        httpd_resp_error(res, 400, "invalid %s parameter: expected a finite number", name);
        return -1;
    }
    return 0;
}

static void handle(const struct httpd_request *req, struct httpd_response *res)
{
    char op[OP_MAX + 1];
    double a, b, r;

    ssize_t n = httpd_query_param(req->query, "op", op, sizeof op);
    if (n <= 0) {
        httpd_resp_error(res, 400, "missing op parameter (use add, subtract, multiply, divide)");
        return;
    }
    int code;
    if (strcmp(op, "add") == 0) code = '+';
    else if (strcmp(op, "subtract") == 0) code = '-';
    else if (strcmp(op, "multiply") == 0) code = '*';
    else if (strcmp(op, "divide") == 0) code = '/';
    else {
        /* The op is echoed JSON-escaped by httpd_resp_error (truncated if huge). */
        httpd_resp_error(res, 400, "unknown op '%.*s' (use add, subtract, multiply, divide)",
                         (int)strlen(op), op);
        return;
    }
    if (get_number(req, res, "a", &a) != 0 || get_number(req, res, "b", &b) != 0)
        return;

    switch (code) {
    case '+': r = a + b; break;
    case '-': r = a - b; break;
    case '*': r = a * b; break;
    default:
        if (b == 0.0) {
            httpd_resp_error(res, 400, "division by zero");
            return;
        }
        r = a / b;
    }
    if (!isfinite(r)) {
        httpd_resp_error(res, 400, "result is not a finite number");
        return;
    }
    httpd_resp_append(res, "{\"op\": \"%s\", \"a\": %.15g, \"b\": %.15g, \"result\": %.15g",
                      op, a, b, r);
    httpd_resp_json_end(res);
}

int main(int argc, char **argv)
{
    return httpd_main("calculator", argc, argv, handle);
}
