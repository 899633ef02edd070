/*
 * libFuzzer driver for backend responses: src/gw_resp.c (the reader proxy
 * routes and aggregate calls share), the proxy's response head filter
 * (gw_proxy_response_head) and the aggregate's answer check (gw_json_valid
 * against jansson).
 *
 * Input: byte 0 is the piece size (0: the whole input at once), byte 1
 * the mode (bit 0: the answer to a HEAD request; bit 1: an aggregate call
 * with max_response_bytes (byte 1 >> 2) * 64 + 1, else a proxy route), the
 * rest is what the backend sends. The response is read twice, at once and
 * in pieces, and both readings must agree (result, error kind, status,
 * fields, body); every reading must keep gw_resp.h's promises: one final
 * head with a status in 200-599, fields with token names and values free
 * of control characters, within the limits, no body beyond the
 * Content-Length or max_body, none for HEAD, 204 and 304. Besides crashes,
 * leaks and UB, a broken promise aborts.
 */
#include "gw_json.h"
#include "gw_proxy.h"
#include "gw_resp.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define BODY_KEEP 8192 /* body bytes compared between the two readings */

typedef struct {
    int heads;
    int status;
    int64_t content_length;
    char *hbuf; /* names and values, as gw_resp hands them over */
    size_t hlen, hcap;
    gw_header_t *hdrs;
    size_t nhdrs, hdrs_cap;
    bool in_field, in_value;
    uint64_t body_total;
    char body[BODY_KEEP];
    size_t blen;
    gw_resp_result_t result;
    gw_resp_error_t error;
} reading_t;

#define READING(r) ((reading_t *)(r)->arg)

static void
must(bool ok)
{
    if (!ok)
        abort();
}

static void
keep(reading_t *rd, const char *at, size_t len)
{
    gw_grow((void **)&rd->hbuf, &rd->hcap, rd->hlen + len + 1, 1);
    memcpy(rd->hbuf + rd->hlen, at, len);
    rd->hlen += len;
}

static bool
tchar(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int
on_field(gw_resp_t *r, const char *at, size_t len)
{
    reading_t *rd = READING(r);
    must(rd->heads == 0);
    if (!rd->in_field) {
        gw_grow((void **)&rd->hdrs, &rd->hdrs_cap, rd->nhdrs + 1, sizeof(gw_header_t));
        memset(&rd->hdrs[rd->nhdrs], 0, sizeof(gw_header_t));
        rd->hdrs[rd->nhdrs].name_off = (uint32_t)rd->hlen;
        rd->in_field = true;
        rd->in_value = false;
    }
    for (size_t i = 0; i < len; i++)
        must(tchar((unsigned char)at[i]));
    rd->hdrs[rd->nhdrs].name_len += (uint32_t)len;
    keep(rd, at, len);
    return GW_OK;
}

static int
on_value(gw_resp_t *r, const char *at, size_t len)
{
    reading_t *rd = READING(r);
    must(rd->in_field);
    gw_header_t *h = &rd->hdrs[rd->nhdrs];
    if (!rd->in_value) {
        h->value_off = (uint32_t)rd->hlen;
        rd->in_value = true;
    }
    for (size_t i = 0; i < len; i++)
        must(((unsigned char)at[i] >= 0x20 || at[i] == '\t') && at[i] != 0x7f);
    h->value_len += (uint32_t)len;
    keep(rd, at, len);
    return GW_OK;
}

static int
on_value_done(gw_resp_t *r)
{
    reading_t *rd = READING(r);
    must(rd->in_field && rd->hdrs[rd->nhdrs].name_len > 0);
    if (!rd->in_value)
        rd->hdrs[rd->nhdrs].value_off = (uint32_t)rd->hlen;
    rd->nhdrs++;
    rd->in_field = rd->in_value = false;
    must(rd->nhdrs <= GW_RESP_FIELDS_MAX && rd->hlen <= GW_RESP_HEAD_MAX);
    return GW_OK;
}

static void
on_reset(gw_resp_t *r)
{
    reading_t *rd = READING(r);
    must(rd->heads == 0);
    rd->hlen = rd->nhdrs = 0;
    rd->in_field = rd->in_value = false;
}

static int
on_head(gw_resp_t *r)
{
    reading_t *rd = READING(r);
    must(rd->heads++ == 0);
    must(r->status >= 200 && r->status <= 599);
    must(!rd->in_field);
    must(r->content_length >= -1);
    bool no_body = r->head_request || r->status == 204 || r->status == 304;
    must(no_body || r->content_length <= (int64_t)r->max_body);
    must(!(r->chunked && r->content_length >= 0));
    rd->status = r->status;
    rd->content_length = no_body ? 0 : r->content_length;
    /* what the proxy would pass on: "Name: value" lines, nothing that frames */
    char *out = NULL;
    size_t len = 0, cap = 0;
    gw_proxy_response_head(rd->hbuf ? rd->hbuf : "", rd->hdrs, rd->nhdrs, &out, &len, &cap);
    for (size_t i = 0; i < len;) {
        char *eol = memchr(out + i, '\r', len - i);
        must(eol != NULL && eol + 1 < out + len && eol[1] == '\n');
        char *colon = memchr(out + i, ':', (size_t)(eol - (out + i)));
        must(colon != NULL && colon > out + i && colon[1] == ' ');
        for (char *p = out + i; p < colon; p++)
            must(tchar((unsigned char)*p));
        size_t nlen = (size_t)(colon - (out + i));
        must(!(nlen == 17 && strncasecmp(out + i, "transfer-encoding", 17) == 0));
        must(!(nlen == 14 && strncasecmp(out + i, "content-length", 14) == 0));
        must(!(nlen == 10 && strncasecmp(out + i, "connection", 10) == 0));
        must(memchr(colon, '\n', (size_t)(eol - colon)) == NULL);
        i = (size_t)(eol - out) + 2;
    }
    free(out);
    return GW_OK;
}

static int
on_body(gw_resp_t *r, const char *at, size_t len)
{
    reading_t *rd = READING(r);
    must(rd->heads == 1 && len > 0);
    must(rd->content_length != 0);
    rd->body_total += len;
    must(rd->body_total <= r->max_body);
    must(rd->content_length < 0 || rd->body_total <= (uint64_t)rd->content_length);
    size_t k = GW_MIN(len, BODY_KEEP - rd->blen);
    memcpy(rd->body + rd->blen, at, k);
    rd->blen += k;
    return GW_OK;
}

static const gw_resp_ops_t ops = {
    .head = on_head, .body = on_body, .field = on_field, .value = on_value, .value_done = on_value_done,
    .reset = on_reset,
};

/* Reads the response in pieces of piece bytes (0: at once), then the EOF. */
static void
read_all(reading_t *rd, const uint8_t *data, size_t size, size_t piece, uint64_t max_body, bool head)
{
    gw_resp_t r;
    memset(rd, 0, sizeof(*rd));
    gw_resp_init(&r, &ops, rd, max_body, head);
    size_t off = 0;
    gw_resp_result_t res = GW_RESP_MORE;
    while (off < size && res == GW_RESP_MORE) {
        size_t n = piece ? GW_MIN(piece, size - off) : size - off;
        size_t used = 0;
        res = gw_resp_execute(&r, (const char *)data + off, n, &used);
        must(used <= n);
        must(res != GW_RESP_MORE || used == n);
        off += used;
    }
    if (res == GW_RESP_MORE)
        res = gw_resp_eof(&r);
    rd->result = res;
    rd->error = r.error;
    must((res == GW_RESP_ERROR) == (r.error != GW_RESP_OK));
    must(res != GW_RESP_ERROR || r.error != GW_RESP_BAD || r.why != NULL);
    if (res == GW_RESP_DONE) {
        must(rd->heads == 1);
        must(rd->content_length < 0 || rd->body_total == (uint64_t)rd->content_length);
        /* a second reading after the end changes nothing */
        size_t used = 1;
        must(gw_resp_execute(&r, "x", 1, &used) == GW_RESP_DONE && used == 0);
    }
}

static void
reading_free(reading_t *rd)
{
    free(rd->hbuf);
    free(rd->hdrs);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t piece = data[0];
    bool head = data[1] & 1;
    bool agg = data[1] & 2;
    uint64_t max_body = agg ? (uint64_t)(data[1] >> 2) * 64 + 1 : (uint64_t)INT64_MAX;
    data += 2;
    size -= 2;
    reading_t whole, pieces;
    read_all(&whole, data, size, 0, max_body, head);
    read_all(&pieces, data, size, piece, max_body, head);
    must(whole.result == pieces.result && whole.error == pieces.error);
    must(whole.heads == pieces.heads && whole.status == pieces.status);
    if (whole.heads) {
        must(whole.nhdrs == pieces.nhdrs && whole.hlen == pieces.hlen);
        must(whole.hlen == 0 || memcmp(whole.hbuf, pieces.hbuf, whole.hlen) == 0);
        must(whole.nhdrs == 0 || memcmp(whole.hdrs, pieces.hdrs, whole.nhdrs * sizeof(gw_header_t)) == 0);
    }
    if (whole.result == GW_RESP_DONE) {
        must(whole.body_total == pieces.body_total && whole.blen == pieces.blen);
        must(memcmp(whole.body, pieces.body, whole.blen) == 0);
        /* an aggregate answer: checked without a tree exactly when jansson parses it */
        if (agg && whole.status <= 299 && whole.blen == whole.body_total && !memchr(whole.body, 0, whole.blen)) {
            size_t st, vl;
            json_error_t e;
            bool ours = gw_json_valid(whole.body, whole.blen, &st, &vl);
            json_t *v = json_loadb(whole.body, whole.blen, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
            must(ours == (v != NULL));
            json_decref(v);
        }
    } else {
        /* a reading that failed may have handed over less of the body in one piece */
        size_t n = GW_MIN(whole.blen, pieces.blen);
        must(memcmp(whole.body, pieces.body, n) == 0);
    }
    reading_free(&whole);
    reading_free(&pieces);
    return 0;
}
