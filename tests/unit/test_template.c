#include "gw_test.h"
static void t(void) {}
TEST_MAIN(T(t))
