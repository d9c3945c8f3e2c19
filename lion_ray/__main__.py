from lion_ray.cli import main

main()
