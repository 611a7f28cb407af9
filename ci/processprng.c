/*
 * A stand-in for Windows' bcryptprimitives.dll, for running Rust programs
 * under Wine 8, which lacks it. Rust's standard library gets its random
 * seeds (HashMap keys) from ProcessPrng; this exports that one function on
 * top of RtlGenRandom (advapi32's SystemFunction036), which Wine has.
 * Built by ci/windows.sh with mingw-w64; never part of a release.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
