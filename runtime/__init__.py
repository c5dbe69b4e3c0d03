"""pcpc.runtime: load VMFB + meta.json, validated calls, device-resident state, the loops."""
