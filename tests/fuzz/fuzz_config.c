/*
 * libFuzzer driver for the configuration loader (src/gw_config.c): any text
 * must either load or be rejected with a message, without crashing, leaking
 * or reading past the text while locating the error line.
 */
#include "gw_config.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (text == NULL)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';
    char err[1024];
    /* basedir points nowhere, so includes find nothing on this machine */
    gw_config_t *cfg = gw_config_parse(text, "fuzz.json", "/nonexistent-gatherd-fuzz", 1, err, sizeof(err));
    gw_config_unref(cfg);
    free(text);
    return 0;
}
