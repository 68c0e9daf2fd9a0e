/*
 * auth.cgi - demo authentication API for cgipool.
 *
 *   GET /?user=alice  -> {"user": "alice", "authenticated": true, "token": "<16 hex>", "pid": ..., "port": ...}
 *   GET /             -> 400 {"error": "missing user parameter", ...}
 *
 * The token is the FNV-1a 64-bit hash of the user name: deterministic, so every
 * worker of the pool hands out the same token for the same user.
 *
 * Usage: auth.cgi PORT   (or $PORT)
 */
#include "../lib/httpd.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>

#define USER_MAX 256

static uint64_t fnv1a64(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static void handle(const struct httpd_request *req, struct httpd_response *res)
{
    char user[USER_MAX + 1];

    ssize_t n = httpd_query_param(req->query, "user", user, sizeof user);
    if (n <= 0) {
        httpd_resp_error(res, 400, "missing user parameter");
        return;
    }
    if ((size_t)n > USER_MAX) {
        httpd_resp_error(res, 400, "user parameter too long (max %d bytes)", USER_MAX);
        return;
    }
    httpd_resp_append(res, "{\"user\": ");
    httpd_resp_json_stringn(res, user, (size_t)n);
    httpd_resp_append(res, ", \"authenticated\": true, \"token\": \"%016" PRIx64 "\"",
                      fnv1a64(user, (size_t)n));
    httpd_resp_json_end(res);
}

int main(int argc, char **argv)
{
    return httpd_main("auth", argc, argv, handle);
}
