/*
 * httpd.c - single-threaded epoll HTTP/1.1 server for cgipool workers.
 *
 * Design
 *   - One epoll instance, level-triggered.  The listener, a signalfd for
 *     SIGTERM/SIGINT and every client socket are registered on it.
 *   - Each connection is a small state machine:
 *       READING  waiting for / parsing requests (EPOLLIN)
 *       WRITING  a response is partially sent (EPOLLOUT)
 *       DELAYED  a response is ready but held until c->deadline (no events)
 *       LINGER   a "Connection: close" response was sent; we shut down our
 *                side and discard input briefly so the client sees the
 *                response instead of a reset
 *     Pipelined requests stay in the input buffer and are answered in order,
 *     one at a time, after the previous response has been fully sent.
 *   - The epoll timeout is the earliest delayed-response deadline (or the
 *     listener back-off / the once-a-second idle sweep), so delays never
 *     block other connections.
 *   - Buffers are bounded: the input buffer grows to HTTPD_HEAD_MAX for the
 *     head, or to head + Content-Length (<= 1 MiB) for a POST body.
 */
#define _GNU_SOURCE
#include "httpd.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define IN_INITIAL       2048
#define IN_SHRINK_ABOVE  (64 * 1024)
#define LINGER_MS        2000
#define LINGER_MAX_BYTES (4u << 20)
#define ACCEPT_PAUSE_MS  100
#define SWEEP_MS         1000
#define ACCEPT_BATCH     128
#define MAX_EVENTS       256
#define READ_BATCH       64

enum cstate { C_READING, C_WRITING, C_DELAYED, C_LINGER };

struct conn {
    int fd;
    enum cstate state;
    uint32_t events;            /* currently registered epoll events */
    char *in;                   /* input bytes live in in[in_start .. in_start+in_len) */
    size_t in_cap, in_start, in_len;
    size_t want;                /* bytes the current request needs (head + body), 0 if unknown */
    char *out;                  /* serialized response */
    size_t out_len, out_sent;
    size_t lingered;            /* bytes discarded while lingering */
    int close_after;            /* close once `out` is sent */
    int peer_eof;               /* the client shut down its sending side */
    int64_t last_active;        /* for the idle timeout */
    int64_t deadline;           /* DELAYED: send time; LINGER: give-up time */
    struct conn *prev, *next;   /* all connections */
    struct conn *dprev, *dnext; /* delayed connections */
    int in_dlist;
};

static struct {
    const char *name;
    httpd_handler handler;
    int epfd, lfd, sfd;
    int port, pid;
    int max_conns, nconns;
    struct conn *conns, *delayed;
    int listener_paused;
    int64_t listener_resume_at; /* 0: resume when a connection slot frees */
    int64_t next_sweep;
    int64_t now;
    int stop_signal;
} S;

static char tag_listener, tag_signal;   /* epoll data.ptr markers */

/* Scratch space: the server is single-threaded and handles one request at a time. */
static struct httpd_response g_res;
static char g_method[33];
static char g_target[HTTPD_LINE_MAX + 1];
static char g_path[HTTPD_LINE_MAX + 1];
static char g_discard[16384];

/* ------------------------------------------------------------------------ */
/* Small helpers                                                             */

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 201: return "Created";
    case 204: return "No Content";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default:  return "Unknown";
    }
}

/* RFC 9110 token characters. */
static int is_tchar(unsigned char ch)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
        return 1;
    return ch != 0 && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

static int hexval(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Public string helpers                                                     */

size_t httpd_url_decode(const char *in, size_t inlen, char *out, size_t outlen)
{
    size_t n = 0;
    for (size_t i = 0; i < inlen; i++) {
        unsigned char ch = (unsigned char)in[i];
        if (ch == '+') {
            ch = ' ';
        } else if (ch == '%' && i + 2 < inlen) {
            int hi = hexval((unsigned char)in[i + 1]), lo = hexval((unsigned char)in[i + 2]);
            if (hi >= 0 && lo >= 0) {
                ch = (unsigned char)(hi * 16 + lo);
                i += 2;
            }
        }
        if (n + 1 < outlen)
            out[n] = (char)ch;
        n++;
    }
    if (outlen > 0)
        out[n < outlen ? n : outlen - 1] = '\0';
    return n;
}

ssize_t httpd_query_param(const char *query, const char *name, char *out, size_t outlen)
{
    size_t namelen = strlen(name);
    char key[128];

    if (outlen > 0)
        out[0] = '\0';
    if (query == NULL || namelen >= sizeof key)
        return -1;
    const char *p = query;
    for (;;) {
        const char *amp = strchr(p, '&');
        size_t seglen = amp ? (size_t)(amp - p) : strlen(p);
        const char *eq = memchr(p, '=', seglen);
        size_t klen = eq ? (size_t)(eq - p) : seglen;
        if (seglen > 0) {
            size_t kl = httpd_url_decode(p, klen, key, sizeof key);
            if (kl == namelen && memcmp(key, name, namelen) == 0) {
                if (eq == NULL)
                    return 0;
                size_t n = httpd_url_decode(eq + 1, seglen - klen - 1, out, outlen);
                return n > (size_t)SSIZE_MAX ? SSIZE_MAX : (ssize_t)n;
            }
        }
        if (amp == NULL)
            return -1;
        p = amp + 1;
    }
}

const char *httpd_query_get(const struct httpd_request *req, const char *name,
                            char *out, size_t outlen)
{
    return httpd_query_param(req->query, name, out, outlen) >= 0 ? out : NULL;
}

/* Length of the valid UTF-8 sequence at s[0..n), or 0 if it is invalid. */
static size_t utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0], cp, min;
    size_t len;

    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF)      { len = 2; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0)     { len = 3; cp = c & 0x0F; min = 0x800; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

size_t httpd_json_escape(const char *in, size_t inlen, char *out, size_t outlen)
{
    size_t total = 0, written = 0;
    int full = 0;
    const unsigned char *s = (const unsigned char *)in;

    for (size_t i = 0; i < inlen;) {
        char tmp[8];
        const char *piece = tmp;
        size_t plen, adv = 1;
        unsigned char c = s[i];

        switch (c) {
        case '"':  piece = "\\\""; plen = 2; break;
        case '\\': piece = "\\\\"; plen = 2; break;
        case '\n': piece = "\\n"; plen = 2; break;
        case '\r': piece = "\\r"; plen = 2; break;
        case '\t': piece = "\\t"; plen = 2; break;
        case '\b': piece = "\\b"; plen = 2; break;
        case '\f': piece = "\\f"; plen = 2; break;
        default:
            if (c < 0x20 || c == 0x7F) {
                snprintf(tmp, sizeof tmp, "\\u%04x", c);
                plen = 6;
            } else if (c < 0x80) {
                piece = (const char *)s + i;
                plen = 1;
            } else if ((adv = utf8_seq_len(s + i, inlen - i)) > 0) {
                piece = (const char *)s + i;
                plen = adv;
            } else {
                piece = "\\ufffd";
                plen = 6;
                adv = 1;
            }
        }
        if (!full && written + plen < outlen) {
            memcpy(out + written, piece, plen);
            written += plen;
        } else {
            full = 1;       /* never emit half an escape */
        }
        total += plen;
        i += adv;
    }
    if (outlen > 0)
        out[written] = '\0';
    return total;
}

/* ------------------------------------------------------------------------ */
/* Response building                                                         */

void httpd_resp_append(struct httpd_response *res, const char *fmt, ...)
{
    if (res->overflow)
        return;
    size_t room = sizeof res->body - res->len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(res->body + res->len, room, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= room) {
        res->overflow = 1;
        res->body[res->len] = '\0';
        return;
    }
    res->len += (size_t)n;
}

void httpd_resp_json_stringn(struct httpd_response *res, const char *s, size_t n)
{
    if (res->overflow)
        return;
    size_t room = sizeof res->body - res->len;
    if (room < 3) {
        res->overflow = 1;
        return;
    }
    char *p = res->body + res->len;
    size_t e = httpd_json_escape(s, n, p + 1, room - 1);
    if (e + 2 >= room) {            /* opening quote + text + closing quote + NUL */
        res->overflow = 1;
        *p = '\0';
        return;
    }
    p[0] = '"';
    p[1 + e] = '"';
    p[2 + e] = '\0';
    res->len += e + 2;
}

void httpd_resp_json_string(struct httpd_response *res, const char *s)
{
    httpd_resp_json_stringn(res, s, strlen(s));
}

void httpd_resp_json_end(struct httpd_response *res)
{
    httpd_resp_append(res, ", \"pid\": %d, \"port\": %d}", res->pid, res->port);
}

static void resp_verror(struct httpd_response *res, int status, const char *fmt, va_list ap)
{
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    res->status = status;
    res->len = 0;
    res->overflow = 0;
    res->body[0] = '\0';
    httpd_resp_append(res, "{\"error\": ");
    httpd_resp_json_string(res, msg);
    httpd_resp_json_end(res);
}

void httpd_resp_error(struct httpd_response *res, int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    resp_verror(res, status, fmt, ap);
    va_end(ap);
}

static void resp_reset(struct httpd_response *res)
{
    res->status = 200;
    res->delay_ms = 0;
    res->len = 0;
    res->overflow = 0;
    res->body[0] = '\0';
    res->pid = S.pid;
    res->port = S.port;
}

/* ------------------------------------------------------------------------ */
/* Connections                                                               */

static void listener_pause(int64_t resume_at)
{
    if (!S.listener_paused) {
        struct epoll_event ev = { .events = 0, .data.ptr = &tag_listener };
        epoll_ctl(S.epfd, EPOLL_CTL_MOD, S.lfd, &ev);
        S.listener_paused = 1;
    }
    S.listener_resume_at = resume_at;
}

static void listener_resume(void)
{
    if (S.listener_paused) {
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &tag_listener };
        epoll_ctl(S.epfd, EPOLL_CTL_MOD, S.lfd, &ev);
        S.listener_paused = 0;
        S.listener_resume_at = 0;
    }
}

static void dlist_add(struct conn *c)
{
    c->dprev = NULL;
    c->dnext = S.delayed;
    if (S.delayed)
        S.delayed->dprev = c;
    S.delayed = c;
    c->in_dlist = 1;
}

static void dlist_remove(struct conn *c)
{
    if (!c->in_dlist)
        return;
    if (c->dprev) c->dprev->dnext = c->dnext;
    else S.delayed = c->dnext;
    if (c->dnext) c->dnext->dprev = c->dprev;
    c->dprev = c->dnext = NULL;
    c->in_dlist = 0;
}

static void conn_close(struct conn *c)
{
    dlist_remove(c);
    if (c->prev) c->prev->next = c->next;
    else S.conns = c->next;
    if (c->next) c->next->prev = c->prev;
    epoll_ctl(S.epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->in);
    free(c->out);
    free(c);
    S.nconns--;
    if (S.listener_paused && S.listener_resume_at == 0 && S.nconns < S.max_conns)
        listener_resume();
}

static int set_events(struct conn *c, uint32_t events)
{
    if (c->events == events)
        return 0;
    struct epoll_event ev = { .events = events, .data.ptr = c };
    if (epoll_ctl(S.epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        return -1;
    c->events = events;
    return 0;
}

static void do_accept(void)
{
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        if (S.nconns >= S.max_conns) {
            listener_pause(0);
            return;
        }
        int fd = accept4(S.lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of descriptors/memory: back off instead of spinning. */
                listener_pause(S.now + ACCEPT_PAUSE_MS);
                return;
            }
            continue;   /* EINTR, ECONNABORTED, EPROTO, network errors: next one */
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

        struct conn *c = calloc(1, sizeof *c);
        char *in = c ? malloc(IN_INITIAL) : NULL;
        if (c == NULL || in == NULL) {
            free(c);
            close(fd);
            listener_pause(S.now + ACCEPT_PAUSE_MS);
            return;
        }
        c->fd = fd;
        c->in = in;
        c->in_cap = IN_INITIAL;
        c->state = C_READING;
        c->events = EPOLLIN;
        c->last_active = S.now;
        struct epoll_event ev = { .events = EPOLLIN, .data.ptr = c };
        if (epoll_ctl(S.epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
            free(in);
            free(c);
            close(fd);
            continue;
        }
        c->next = S.conns;
        if (S.conns)
            S.conns->prev = c;
        S.conns = c;
        S.nconns++;
    }
}

/* ------------------------------------------------------------------------ */
/* Request parsing                                                           */

struct parsed {
    int error;                  /* status of a library error response, 0 if none */
    const char *errmsg;
    size_t head_len;            /* request line + headers + blank line */
    size_t content_length;
    int minor;                  /* HTTP/1.<minor> */
    int keep_alive;
    const char *method, *target;
    size_t method_len, target_len;
};

static int set_error(struct parsed *p, int status, const char *msg)
{
    p->error = status;
    p->errmsg = msg;
    return 1;
}

/* Does the comma-separated header value contain `token` (case-insensitive)? */
static int has_token(const char *v, size_t n, const char *token)
{
    size_t tl = strlen(token), i = 0;
    while (i < n) {
        while (i < n && (v[i] == ' ' || v[i] == '\t' || v[i] == ','))
            i++;
        size_t start = i;
        while (i < n && v[i] != ',')
            i++;
        size_t end = i;
        while (end > start && (v[end - 1] == ' ' || v[end - 1] == '\t'))
            end--;
        if (end - start == tl && strncasecmp(v + start, token, tl) == 0)
            return 1;
    }
    return 0;
}

static int name_is(const char *name, size_t len, const char *want)
{
    return strlen(want) == len && strncasecmp(name, want, len) == 0;
}

/*
 * Parse the request head at buf[0..len).  Returns 0 when more data is
 * needed, 1 when done: then either p->error is set or the head is valid.
 */
static int parse_head(const char *buf, size_t len, struct parsed *p)
{
    memset(p, 0, sizeof *p);

    /* Fail fast on a method that is not a token (binary garbage). */
    size_t i = 0;
    while (i < len && i <= 32 && is_tchar((unsigned char)buf[i]))
        i++;
    if (i < len && (i == 0 || i > 32 || buf[i] != ' '))
        return set_error(p, 400, "malformed request line");

    size_t scan = len < HTTPD_LINE_MAX ? len : HTTPD_LINE_MAX;
    const char *nl = memchr(buf, '\n', scan);
    if (nl == NULL) {
        if (memchr(buf, '\0', scan))
            return set_error(p, 400, "NUL byte in request");
        if (len >= HTTPD_LINE_MAX)
            return set_error(p, 414, "request line too long");
        return 0;
    }

    /* Find the blank line that ends the head ("\n\n" or "\n\r\n"). */
    size_t limit = len < HTTPD_HEAD_MAX ? len : HTTPD_HEAD_MAX;
    size_t end = 0;
    for (size_t k = (size_t)(nl - buf); k < limit; k++) {
        if (buf[k] != '\n')
            continue;
        if (k + 1 < limit && buf[k + 1] == '\n') { end = k + 2; break; }
        if (k + 2 < limit && buf[k + 1] == '\r' && buf[k + 2] == '\n') { end = k + 3; break; }
    }
    if (memchr(buf, '\0', end ? end : limit))
        return set_error(p, 400, "NUL byte in request");
    if (end == 0) {
        if (len >= HTTPD_HEAD_MAX)
            return set_error(p, 431, "request header too large");
        return 0;
    }
    p->head_len = end;

    /* Request line: METHOD SP TARGET SP HTTP/1.x */
    size_t ll = (size_t)(nl - buf);
    if (ll > 0 && buf[ll - 1] == '\r')
        ll--;
    size_t m = 0;
    while (m < ll && is_tchar((unsigned char)buf[m]))
        m++;
    if (m == 0 || m > 32 || m >= ll || buf[m] != ' ')
        return set_error(p, 400, "malformed request line");
    p->method = buf;
    p->method_len = m;
    size_t t = m + 1, te = t;
    while (te < ll && (unsigned char)buf[te] > 0x20 && buf[te] != 0x7F)
        te++;
    if (te == t || te >= ll || buf[te] != ' ')
        return set_error(p, 400, "malformed request line");
    p->target = buf + t;
    p->target_len = te - t;
    const char *ver = buf + te + 1;
    size_t vl = ll - (te + 1);
    if (vl == 8 && memcmp(ver, "HTTP/", 5) == 0 && ver[6] == '.' &&
        ver[5] >= '0' && ver[5] <= '9' && ver[7] >= '0' && ver[7] <= '9') {
        if (ver[5] != '1')
            return set_error(p, 505, "HTTP version not supported");
        p->minor = ver[7] - '0';
    } else {
        return set_error(p, 400, "malformed request line");
    }
    if (p->target[0] != '/')
        return set_error(p, 400, "request target must start with '/'");

    /* Header fields. */
    int conn_close = 0, conn_keep = 0, has_te = 0, te_chunked = 0, have_cl = 0, nheaders = 0;
    size_t cl = 0;
    size_t pos = (size_t)(nl - buf) + 1;
    for (;;) {
        const char *eol = memchr(buf + pos, '\n', end - pos);
        if (eol == NULL)    /* cannot happen: the head ends with a newline */
            return set_error(p, 400, "malformed header");
        size_t le = (size_t)(eol - buf);
        size_t ce = le;
        if (ce > pos && buf[ce - 1] == '\r')
            ce--;
        if (ce == pos)      /* blank line: end of head */
            break;
        const char *line = buf + pos;
        size_t n = ce - pos;
        pos = le + 1;

        if (++nheaders > HTTPD_HEADERS_MAX)
            return set_error(p, 431, "too many header fields");
        if (line[0] == ' ' || line[0] == '\t')
            return set_error(p, 400, "obsolete header line folding");
        size_t k = 0;
        while (k < n && is_tchar((unsigned char)line[k]))
            k++;
        if (k == 0 || k >= n || line[k] != ':')
            return set_error(p, 400, "malformed header field");
        const char *name = line;
        size_t namelen = k;
        size_t vs = k + 1, ve = n;
        while (vs < ve && (line[vs] == ' ' || line[vs] == '\t'))
            vs++;
        while (ve > vs && (line[ve - 1] == ' ' || line[ve - 1] == '\t'))
            ve--;
        for (size_t j = vs; j < ve; j++) {
            unsigned char ch = (unsigned char)line[j];
            if ((ch < 0x20 && ch != '\t') || ch == 0x7F)
                return set_error(p, 400, "control character in header value");
        }
        const char *val = line + vs;
        size_t vlen = ve - vs;

        if (name_is(name, namelen, "Content-Length")) {
            if (vlen == 0)
                return set_error(p, 400, "invalid Content-Length");
            size_t v = 0;
            for (size_t j = 0; j < vlen; j++) {
                if (val[j] < '0' || val[j] > '9')
                    return set_error(p, 400, "invalid Content-Length");
                if (v <= HTTPD_REQ_BODY_MAX)
                    v = v * 10 + (size_t)(val[j] - '0');
            }
            if (v > HTTPD_REQ_BODY_MAX)
                v = HTTPD_REQ_BODY_MAX + 1;   /* saturate: "too large" */
            if (have_cl && v != cl)
                return set_error(p, 400, "conflicting Content-Length headers");
            have_cl = 1;
            cl = v;
        } else if (name_is(name, namelen, "Transfer-Encoding")) {
            has_te = 1;
            if (has_token(val, vlen, "chunked"))
                te_chunked = 1;
        } else if (name_is(name, namelen, "Connection")) {
            if (has_token(val, vlen, "close"))
                conn_close = 1;
            if (has_token(val, vlen, "keep-alive"))
                conn_keep = 1;
        }
    }

    if (has_te)
        return set_error(p, 501, te_chunked ? "chunked request bodies are not supported"
                                            : "Transfer-Encoding is not supported");
    if (cl > HTTPD_REQ_BODY_MAX)
        return set_error(p, 413, "request body too large (max 1048576 bytes)");
    p->content_length = cl;
    p->keep_alive = p->minor >= 1 ? !conn_close : (conn_keep && !conn_close);
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Responses                                                                 */

static void start_linger(struct conn *c)
{
    shutdown(c->fd, SHUT_WR);
    c->state = C_LINGER;
    c->in_len = 0;
    c->in_start = 0;
    c->lingered = 0;
    c->deadline = S.now + LINGER_MS;
    if (set_events(c, EPOLLIN) < 0)
        conn_close(c);
}

/*
 * Send what is left of c->out.  Returns 1 when everything was sent and the
 * connection is READING again, 0 when the socket is full (EPOLLOUT armed),
 * -1 when the connection was closed or is lingering (stop touching it).
 */
static int conn_flush(struct conn *c)
{
    while (c->out_sent < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_sent, c->out_len - c->out_sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->out_sent += (size_t)n;
            c->last_active = S.now;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->state = C_WRITING;
            if (set_events(c, EPOLLOUT) < 0) {
                conn_close(c);
                return -1;
            }
            return 0;
        }
        conn_close(c);
        return -1;
    }
    free(c->out);
    c->out = NULL;
    c->out_len = c->out_sent = 0;
    if (c->close_after) {
        start_linger(c);
        return -1;
    }
    c->state = C_READING;
    c->last_active = S.now;
    return 1;
}

/* Serialize g_res into c->out.  Returns 0, or -1 after closing on ENOMEM. */
static int queue_response(struct conn *c, int head_only, int close_after, const char *extra)
{
    struct httpd_response *res = &g_res;
    char hdr[512];
    size_t blen = res->len + 1;     /* body + trailing newline */
    int hn = snprintf(hdr, sizeof hdr,
                      "HTTP/1.1 %d %s\r\n"
                      "Content-Type: application/json\r\n"
                      "Content-Length: %zu\r\n"
                      "Cache-Control: no-store\r\n"
                      "Connection: %s\r\n"
                      "%s"
                      "\r\n",
                      res->status, reason(res->status), blen,
                      close_after ? "close" : "keep-alive", extra ? extra : "");
    if (hn < 0 || (size_t)hn >= sizeof hdr) {
        conn_close(c);
        return -1;
    }
    size_t total = (size_t)hn + (head_only ? 0 : blen);
    char *out = malloc(total);
    if (out == NULL) {
        conn_close(c);
        return -1;
    }
    memcpy(out, hdr, (size_t)hn);
    if (!head_only) {
        memcpy(out + hn, res->body, res->len);
        out[total - 1] = '\n';
    }
    free(c->out);
    c->out = out;
    c->out_len = total;
    c->out_sent = 0;
    c->close_after = close_after;

    unsigned delay = res->delay_ms > HTTPD_DELAY_MAX_MS ? HTTPD_DELAY_MAX_MS : res->delay_ms;
    if (delay > 0) {
        c->state = C_DELAYED;
        c->deadline = S.now + delay;
        dlist_add(c);
        if (set_events(c, 0) < 0) {
            conn_close(c);
            return -1;
        }
    } else {
        c->state = C_WRITING;
    }
    return 0;
}

static void consume(struct conn *c, size_t n)
{
    c->in_start += n;
    c->in_len -= n;
    if (c->in_len == 0)
        c->in_start = 0;
    /* Give back the memory of a large POST body once it is processed. */
    if (c->in_cap > IN_SHRINK_ABOVE && c->in_len <= HTTPD_HEAD_MAX) {
        memmove(c->in, c->in + c->in_start, c->in_len);
        c->in_start = 0;
        char *smaller = realloc(c->in, HTTPD_HEAD_MAX);
        if (smaller) {
            c->in = smaller;
            c->in_cap = HTTPD_HEAD_MAX;
        }
    }
}

/*
 * Try to answer the next buffered request.  Returns 1 when a response was
 * queued, 0 when more input is needed, -1 when the connection was closed.
 */
static int handle_one(struct conn *c)
{
    /* Tolerate stray CRLFs between requests (RFC 9112 section 2.2). */
    while (c->in_len > 0 && (c->in[c->in_start] == '\r' || c->in[c->in_start] == '\n'))
        consume(c, 1);
    if (c->in_len == 0)
        return 0;

    struct parsed p;
    const char *buf = c->in + c->in_start;
    if (!parse_head(buf, c->in_len, &p))
        return 0;
    resp_reset(&g_res);
    if (p.error) {
        httpd_resp_error(&g_res, p.error, "%s", p.errmsg);
        c->in_len = 0;
        c->in_start = 0;
        return queue_response(c, 0, 1, NULL) < 0 ? -1 : 1;
    }
    size_t total = p.head_len + p.content_length;
    if (c->in_len < total) {
        c->want = total;
        return 0;
    }
    c->want = 0;

    memcpy(g_method, p.method, p.method_len);
    g_method[p.method_len] = '\0';
    memcpy(g_target, p.target, p.target_len);
    g_target[p.target_len] = '\0';
    const char *qm = strchr(g_target, '?');
    size_t plen = qm ? (size_t)(qm - g_target) : p.target_len;
    memcpy(g_path, g_target, plen);
    g_path[plen] = '\0';

    struct httpd_request req = {
        .method = g_method,
        .target = g_target,
        .path = g_path,
        .query = qm ? qm + 1 : "",
        .body = p.content_length ? buf + p.head_len : NULL,
        .body_len = p.content_length,
        .http_minor = p.minor,
        .pid = S.pid,
        .port = S.port,
    };
    int is_head = strcmp(g_method, "HEAD") == 0;
    const char *extra = NULL;

    if (strcmp(g_method, "GET") != 0 && !is_head && strcmp(g_method, "POST") != 0) {
        httpd_resp_error(&g_res, 405, "method %s not allowed (use GET, HEAD or POST)", g_method);
        extra = "Allow: GET, HEAD, POST\r\n";
    } else if (strcmp(g_path, "/") != 0) {
        httpd_resp_error(&g_res, 404, "not found: %s (this worker only serves /)", g_path);
    } else {
        S.handler(&req, &g_res);
        if (g_res.overflow)
            httpd_resp_error(&g_res, 500, "response too large");
        else if (g_res.status < 200 || g_res.status > 599)
            httpd_resp_error(&g_res, 500, "handler returned invalid status %d", g_res.status);
        else if (g_res.len == 0)
            httpd_resp_error(&g_res, 500, "handler returned an empty body");
    }
    consume(c, total);
    return queue_response(c, is_head, !p.keep_alive, extra) < 0 ? -1 : 1;
}

/* Answer every complete buffered request, in order, as far as the socket allows. */
static void conn_process(struct conn *c)
{
    for (;;) {
        int r = handle_one(c);
        if (r < 0)
            return;
        if (r == 0)
            break;
        if (c->state == C_DELAYED)
            return;
        if (conn_flush(c) <= 0)
            return;
    }
    if (c->peer_eof) {
        conn_close(c);
        return;
    }
    if (set_events(c, EPOLLIN) < 0)
        conn_close(c);
}

static void conn_readable(struct conn *c)
{
    for (int iter = 0; iter < READ_BATCH; iter++) {
        if (c->in_len == 0)
            c->in_start = 0;
        if (c->in_start + c->in_len == c->in_cap && c->in_start > 0) {
            memmove(c->in, c->in + c->in_start, c->in_len);
            c->in_start = 0;
        }
        if (c->in_len == c->in_cap) {
            size_t limit = c->want > HTTPD_HEAD_MAX ? c->want : HTTPD_HEAD_MAX;
            if (c->in_cap >= limit)
                break;          /* full: let the parser answer or reject it */
            size_t ncap = c->in_cap * 2;
            if (ncap > limit)
                ncap = limit;
            char *bigger = realloc(c->in, ncap);
            if (bigger == NULL) {
                conn_close(c);
                return;
            }
            c->in = bigger;
            c->in_cap = ncap;
        }
        size_t room = c->in_cap - c->in_start - c->in_len;
        ssize_t n = recv(c->fd, c->in + c->in_start + c->in_len, room, 0);
        if (n > 0) {
            c->in_len += (size_t)n;
            c->last_active = S.now;
            if ((size_t)n < room)
                break;          /* drained the socket for now */
            continue;
        }
        if (n == 0) {
            c->peer_eof = 1;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        conn_close(c);          /* ECONNRESET etc. */
        return;
    }
    conn_process(c);
}

static void conn_linger_read(struct conn *c)
{
    for (int iter = 0; iter < READ_BATCH; iter++) {
        ssize_t n = recv(c->fd, g_discard, sizeof g_discard, 0);
        if (n > 0) {
            c->lingered += (size_t)n;
            if (c->lingered > LINGER_MAX_BYTES) {
                conn_close(c);
                return;
            }
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        conn_close(c);          /* EOF or error: done */
        return;
    }
}

static void conn_event(struct conn *c, uint32_t events)
{
    if (events & EPOLLERR) {
        conn_close(c);
        return;
    }
    switch (c->state) {
    case C_READING:
        if (events & (EPOLLIN | EPOLLHUP))
            conn_readable(c);
        break;
    case C_WRITING:
        if (events & EPOLLHUP) {
            conn_close(c);
        } else if (events & EPOLLOUT) {
            if (conn_flush(c) > 0)
                conn_process(c);
        }
        break;
    case C_DELAYED:
        if (events & EPOLLHUP)      /* the client is gone; drop the pending reply */
            conn_close(c);
        break;
    case C_LINGER:
        if (events & EPOLLHUP)
            conn_close(c);
        else if (events & EPOLLIN)
            conn_linger_read(c);
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* Timers                                                                    */

static int compute_timeout(void)
{
    int64_t t = 0;
    int have = 0;
#define CONSIDER(d) do { int64_t d_ = (d); if (!have || d_ < t) { t = d_; have = 1; } } while (0)
    for (struct conn *c = S.delayed; c; c = c->dnext)
        CONSIDER(c->deadline - S.now);
    if (S.listener_paused && S.listener_resume_at)
        CONSIDER(S.listener_resume_at - S.now);
    if (S.nconns > 0)
        CONSIDER(S.next_sweep - S.now);
#undef CONSIDER
    if (!have)
        return -1;
    if (t < 0)
        return 0;
    return t > INT_MAX ? INT_MAX : (int)t;
}

static void fire_delayed(void)
{
    struct conn *c = S.delayed, *next;
    for (; c; c = next) {
        next = c->dnext;
        if (c->deadline > S.now)
            continue;
        dlist_remove(c);
        c->state = C_WRITING;
        if (conn_flush(c) > 0)
            conn_process(c);
    }
}

static void sweep(void)
{
    struct conn *c = S.conns, *next;
    for (; c; c = next) {
        next = c->next;
        switch (c->state) {
        case C_READING:
        case C_WRITING:
            if (S.now - c->last_active >= HTTPD_IDLE_MS)
                conn_close(c);
            break;
        case C_LINGER:
            if (S.now >= c->deadline)
                conn_close(c);
            break;
        case C_DELAYED:
            break;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Startup and main loop                                                     */

static int parse_port(const char *s)
{
    if (s == NULL || *s < '0' || *s > '9')
        return -1;
    long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
        if (v > 65535)
            return -1;
    }
    return (int)v;
}

static int raise_fd_limit(void)
{
    struct rlimit rl;
    int limit = HTTPD_MAX_CONNS + 64;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)limit) {
            rlim_t want = (rlim_t)limit;
            if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
                want = rl.rlim_max;
            rl.rlim_cur = want;
            setrlimit(RLIMIT_NOFILE, &rl);
            getrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)limit)
            limit = (int)rl.rlim_cur;
    }
    int conns = limit - HTTPD_FD_RESERVE;
    if (conns > HTTPD_MAX_CONNS)
        conns = HTTPD_MAX_CONNS;
    return conns < 16 ? 16 : conns;
}

int httpd_main(const char *name, int argc, char **argv, httpd_handler handler)
{
    /* Block the stop signals first; they are read from a signalfd. */
    sigset_t stopset;
    sigemptyset(&stopset);
    sigaddset(&stopset, SIGTERM);
    sigaddset(&stopset, SIGINT);
    sigprocmask(SIG_BLOCK, &stopset, NULL);
    signal(SIGPIPE, SIG_IGN);

    memset(&S, 0, sizeof S);
    S.name = name;
    S.handler = handler;
    S.pid = (int)getpid();
    S.epfd = S.lfd = S.sfd = -1;

    const char *arg = argc > 1 ? argv[1] : getenv("PORT");
    int port = parse_port(arg);
    if (port < 0) {
        fprintf(stderr, "%s: usage: %s PORT   (or set $PORT); got %s%s%s\n", name,
                argc > 0 ? argv[0] : name, arg ? "'" : "", arg ? arg : "nothing",
                arg ? "'" : "");
        return 2;
    }
    S.max_conns = raise_fd_limit();

    S.lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (S.lfd < 0) {
        fprintf(stderr, "%s: socket: %s\n", name, strerror(errno));
        return 1;
    }
    int one = 1;
    setsockopt(S.lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(S.lfd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        fprintf(stderr, "%s: cannot bind 127.0.0.1:%d: %s\n", name, port, strerror(errno));
        close(S.lfd);
        return 1;
    }
    if (listen(S.lfd, 4096) < 0) {
        fprintf(stderr, "%s: listen: %s\n", name, strerror(errno));
        close(S.lfd);
        return 1;
    }
    socklen_t salen = sizeof sa;
    if (getsockname(S.lfd, (struct sockaddr *)&sa, &salen) == 0)
        port = ntohs(sa.sin_port);      /* port 0 picks a free port */
    S.port = port;

    S.sfd = signalfd(-1, &stopset, SFD_NONBLOCK | SFD_CLOEXEC);
    S.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (S.sfd < 0 || S.epfd < 0) {
        fprintf(stderr, "%s: signalfd/epoll: %s\n", name, strerror(errno));
        return 1;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &tag_listener };
    struct epoll_event sev = { .events = EPOLLIN, .data.ptr = &tag_signal };
    if (epoll_ctl(S.epfd, EPOLL_CTL_ADD, S.lfd, &ev) < 0 ||
        epoll_ctl(S.epfd, EPOLL_CTL_ADD, S.sfd, &sev) < 0) {
        fprintf(stderr, "%s: epoll_ctl: %s\n", name, strerror(errno));
        return 1;
    }

    fprintf(stderr, "%s: listening on 127.0.0.1:%d pid=%d\n", name, S.port, S.pid);
    fflush(stderr);

    S.now = now_ms();
    S.next_sweep = S.now + SWEEP_MS;
    struct epoll_event events[MAX_EVENTS];
    int status = 0;

    while (!S.stop_signal) {
        int n = epoll_wait(S.epfd, events, MAX_EVENTS, compute_timeout());
        S.now = now_ms();
        if (n < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "%s: epoll_wait: %s\n", name, strerror(errno));
            status = 1;
            break;
        }
        for (int i = 0; i < n && !S.stop_signal; i++) {
            void *ptr = events[i].data.ptr;
            if (ptr == &tag_signal) {
                struct signalfd_siginfo si;
                while (read(S.sfd, &si, sizeof si) == (ssize_t)sizeof si)
                    S.stop_signal = (int)si.ssi_signo;
            } else if (ptr == &tag_listener) {
                do_accept();
            } else {
                conn_event((struct conn *)ptr, events[i].events);
            }
        }
        if (S.stop_signal)
            break;
        fire_delayed();
        if (S.listener_paused && S.listener_resume_at && S.now >= S.listener_resume_at)
            listener_resume();
        if (S.now >= S.next_sweep) {
            sweep();
            S.next_sweep = S.now + SWEEP_MS;
        }
    }

    if (S.stop_signal)
        fprintf(stderr, "%s: %s received, exiting pid=%d\n", name,
                S.stop_signal == SIGINT ? "SIGINT" : "SIGTERM", S.pid);
    while (S.conns)
        conn_close(S.conns);
    close(S.lfd);
    close(S.sfd);
    close(S.epfd);
    return status;
}
