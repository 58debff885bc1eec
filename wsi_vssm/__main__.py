from wsi_vssm.cli import main

main()
