/*
 * libFuzzer driver for src/gw_json.c: gw_json_valid() must agree with
 * jansson (JSON_DECODE_ANY | JSON_ALLOW_NUL) on every input, since
 * aggregate answers it accepts are copied to clients unparsed; and what
 * jansson loads must serialize (gw_json_dump) into text jansson loads back
 * to an equal value. Inputs holding a raw NUL byte are only checked for
 * refusal: jansson skips a NUL right after a number or literal (its stream
 * uses NUL as "nothing buffered"), gw_json_valid() refuses it.
 */
#include "gw_json.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *s = (const char *)data;
    size_t st = 0, vl = 0;
    bool ours = gw_json_valid(s, size, &st, &vl);
    if (memchr(s, '\0', size)) {
        if (ours)
            abort();
        return 0;
    }
    json_error_t e;
    json_t *v = json_loadb(s, size, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
    if ((v != NULL) != ours)
        abort();
    if (v == NULL)
        return 0;
    if (st + vl > size)
        abort();
    gw_tpl_buf_t b = { 0 };
    gw_json_dump(v, &b);
    json_t *back = json_loadb(b.data, b.len, JSON_DECODE_ANY | JSON_ALLOW_NUL, &e);
    if (back == NULL || !json_equal(v, back))
        abort();
    json_decref(back);
    json_decref(v);
    free(b.data);
    return 0;
}
