/*
 * Compiles llhttp.c of llhttp from the directory configure found (Debian's
 * node-llhttp installs it in /usr/share/llhttp). The sources are built in,
 * never copied into this repository.
 */
#include "llhttp.c"
