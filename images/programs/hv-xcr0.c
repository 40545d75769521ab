/* hv-xcr0: prints the XCR0 user mode runs with (XGETBV), which must be
 * the one the guest kernel set: the state components it saves for its
 * tasks. */
#include <stdint.h>
#include <stdio.h>

int main(void)
{
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    printf("xcr0 %#llx\n", ((unsigned long long)hi << 32) | lo);
    return 0;
}
